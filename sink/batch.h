/*
 * batch.h - one batch of the sink: the readings of the feed entries read
 * since the last commit, as rows in PostgreSQL's COPY text format, and the
 * entry ids to acknowledge per shard once they are committed.
 *
 * A feed entry (docs/streams.md) has fields gw, seq and readings: one line
 * per reading, `device TAB type TAB labels-JSON TAB "device":"…","ts":N,
 * "data":{…}[,"anomalies":[…]] LF`. Reading i of the entry (0-based, in line
 * order, which the hub fixes when it stores the frame) becomes the row
 *   gateway, seq, i, device, type, labels, ts (ms), data, anomalies (\N: none)
 * whose key (gateway, seq, i, ts) is the same however often the entry is
 * read again.
 *
 * Pure: no Redis, no PostgreSQL (unit-tested in tests/unit/test_sink_batch.c).
 */
#ifndef SINK_BATCH_H
#define SINK_BATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/keys.h"

struct sink_row {
	size_t off, len;           /* the row's COPY line in copy */
	int64_t ts_ms;
};

struct sink_ids {
	char **ids;
	size_t n, cap;
};

struct sink_batch {
	char *copy;                /* COPY text: one line per row */
	size_t copy_len, copy_cap;
	struct sink_row *rows;
	size_t nrows, rows_cap;
	size_t nentries;
	uint64_t bad_entries;      /* entries (or lines) that did not parse: skipped, acked */
	struct sink_ids acks[HUB_FEED_SHARDS_MAX];
	int64_t started_ms;        /* first entry added (0: empty) */
};

/* Adds one feed entry of shard: its rows, and id to acknowledge. Returns
 * the rows added (0 for an entry that does not parse, counted in
 * bad_entries: it is still acknowledged, nothing can make it parse). */
size_t sink_batch_add(struct sink_batch *b, unsigned shard, const char *id, const char *gw,
		      size_t gwlen, const char *seq, size_t seqlen, const char *readings,
		      size_t rlen, int64_t now_ms);

/* Empties b, keeping its memory. */
void sink_batch_reset(struct sink_batch *b);
void sink_batch_free(struct sink_batch *b);

/* Appends s (n bytes) to out escaped for COPY text (backslash, tab, LF,
 * CR); exposed for the tests. */
void sink_copy_escape(char **out, size_t *len, size_t *cap, const char *s, size_t n);

#endif
