/*
 * batch.c - feed entries into COPY rows (batch.h).
 */
#define _GNU_SOURCE /* memmem */
#include "sink/batch.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SEQ_MAX_DIGITS 19

static void *xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n);

	if (!q) {
		fprintf(stderr, "iot-sink: out of memory (%zu bytes)\n", n);
		abort();
	}
	return q;
}

static void reserve(char **out, size_t *len, size_t *cap, size_t more)
{
	if (*len + more <= *cap)
		return;
	size_t n = *cap ? *cap : 4096;
	while (n < *len + more)
		n *= 2;
	*out = xrealloc(*out, n);
	*cap = n;
}

static void put(char **out, size_t *len, size_t *cap, const char *s, size_t n)
{
	reserve(out, len, cap, n);
	memcpy(*out + *len, s, n);
	*len += n;
}

void sink_copy_escape(char **out, size_t *len, size_t *cap, const char *s, size_t n)
{
	reserve(out, len, cap, 2 * n);
	for (size_t i = 0; i < n; i++) {
		char c = s[i], e = 0;
		switch (c) {
		case '\\': e = '\\'; break;
		case '\t': e = 't'; break;
		case '\n': e = 'n'; break;
		case '\r': e = 'r'; break;
		default: break;
		}
		if (e) {
			(*out)[(*len)++] = '\\';
			(*out)[(*len)++] = e;
		} else {
			(*out)[(*len)++] = c;
		}
	}
}

static bool all_digits(const char *s, size_t n)
{
	if (!n || n > SEQ_MAX_DIGITS)
		return false;
	for (size_t i = 0; i < n; i++)
		if (s[i] < '0' || s[i] > '9')
			return false;
	return true;
}

/* The end of the JSON object or array that starts at p (its closing
 * bracket + 1), or NULL. Strings are skipped with their escapes. */
static const char *json_end(const char *p, const char *end)
{
	int depth = 0;

	for (; p < end; p++) {
		char c = *p;
		if (c == '"') {
			for (p++; p < end && *p != '"'; p++)
				if (*p == '\\')
					p++;
			if (p >= end)
				return NULL;
		} else if (c == '{' || c == '[') {
			depth++;
		} else if (c == '}' || c == ']') {
			if (--depth == 0)
				return p + 1;
		}
	}
	return NULL;
}

/* `"device":"…","ts":N,"data":{…}[,"anomalies":[…]]`: the ts (ms), the
 * data object and the anomalies array (NULL, 0 when absent). 0 or -1. */
static int body_parse(const char *s, size_t n, int64_t *ts, const char **data, size_t *dlen,
		      const char **anom, size_t *alen)
{
	static const char tsk[] = ",\"ts\":", dk[] = ",\"data\":", ak[] = ",\"anomalies\":";
	const char *p = memmem(s, n, tsk, sizeof(tsk) - 1), *end = s + n, *d, *de;
	int64_t v = 0;
	bool neg = false;
	int digits = 0;

	if (!p)
		return -1;
	p += sizeof(tsk) - 1;
	if (p < end && *p == '-') {
		neg = true;
		p++;
	}
	while (p < end && *p >= '0' && *p <= '9' && digits < 18) {
		v = v * 10 + (*p++ - '0');
		digits++;
	}
	if (!digits || (size_t)(end - p) < sizeof(dk) - 1 || memcmp(p, dk, sizeof(dk) - 1))
		return -1;
	d = p + sizeof(dk) - 1;
	if (d >= end || *d != '{' || !(de = json_end(d, end)))
		return -1;
	*anom = NULL;
	*alen = 0;
	if (de < end) {
		const char *a = de + sizeof(ak) - 1;
		if ((size_t)(end - de) < sizeof(ak) - 1 || memcmp(de, ak, sizeof(ak) - 1) ||
		    a >= end || *a != '[' || json_end(a, end) != end)
			return -1;
		*anom = a;
		*alen = (size_t)(end - a);
	}
	*ts = neg ? -v : v;
	*data = d;
	*dlen = (size_t)(de - d);
	return 0;
}

static void row_add(struct sink_batch *b, size_t off, int64_t ts)
{
	if (b->nrows == b->rows_cap) {
		b->rows_cap = b->rows_cap ? 2 * b->rows_cap : 1024;
		b->rows = xrealloc(b->rows, b->rows_cap * sizeof(b->rows[0]));
	}
	b->rows[b->nrows].off = off;
	b->rows[b->nrows].len = b->copy_len - off;
	b->rows[b->nrows].ts_ms = ts;
	b->nrows++;
}

static void ack_add(struct sink_batch *b, unsigned shard, const char *id)
{
	struct sink_ids *a = &b->acks[shard];
	size_t n = strlen(id);

	if (a->n == a->cap) {
		a->cap = a->cap ? 2 * a->cap : 256;
		a->ids = xrealloc(a->ids, a->cap * sizeof(a->ids[0]));
	}
	a->ids[a->n] = xrealloc(NULL, n + 1);
	memcpy(a->ids[a->n], id, n + 1);
	a->n++;
}

size_t sink_batch_add(struct sink_batch *b, unsigned shard, const char *id, const char *gw,
		      size_t gwlen, const char *seq, size_t seqlen, const char *readings,
		      size_t rlen, int64_t now_ms)
{
	const char *p = readings, *end = readings + rlen;
	size_t added = 0, mark = b->copy_len, nrows0 = b->nrows;
	char idx[16];

	if (shard >= HUB_FEED_SHARDS_MAX)
		return 0;
	if (!b->started_ms)
		b->started_ms = now_ms;
	b->nentries++;
	ack_add(b, shard, id);
	if (!gw || !gwlen || gwlen > HUB_ID_MAX || !all_digits(seq, seqlen) || !readings)
		goto bad;
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p)), *f[4], *data, *anom;
		const char *le = nl ? nl : end;
		size_t flen[4], dlen, alen;
		int64_t ts;
		int nf = 0;
		const char *q = p;

		while (nf < 3) {
			const char *t = memchr(q, '\t', (size_t)(le - q));
			if (!t)
				break;
			f[nf] = q;
			flen[nf] = (size_t)(t - q);
			nf++;
			q = t + 1;
		}
		if (nf != 3 || !flen[0] || !flen[1])
			goto bad;
		f[3] = q;
		flen[3] = (size_t)(le - q);
		if (body_parse(f[3], flen[3], &ts, &data, &dlen, &anom, &alen))
			goto bad;
		size_t off = b->copy_len;
		int il = snprintf(idx, sizeof(idx), "%zu", added);
		char tsb[24];
		int tl = snprintf(tsb, sizeof(tsb), "%lld", (long long)ts);

		sink_copy_escape(&b->copy, &b->copy_len, &b->copy_cap, gw, gwlen);
		put(&b->copy, &b->copy_len, &b->copy_cap, "\t", 1);
		put(&b->copy, &b->copy_len, &b->copy_cap, seq, seqlen);
		put(&b->copy, &b->copy_len, &b->copy_cap, "\t", 1);
		put(&b->copy, &b->copy_len, &b->copy_cap, idx, (size_t)il);
		for (int i = 0; i < 3; i++) {
			put(&b->copy, &b->copy_len, &b->copy_cap, "\t", 1);
			sink_copy_escape(&b->copy, &b->copy_len, &b->copy_cap, f[i], flen[i]);
		}
		put(&b->copy, &b->copy_len, &b->copy_cap, "\t", 1);
		put(&b->copy, &b->copy_len, &b->copy_cap, tsb, (size_t)tl);
		put(&b->copy, &b->copy_len, &b->copy_cap, "\t", 1);
		sink_copy_escape(&b->copy, &b->copy_len, &b->copy_cap, data, dlen);
		put(&b->copy, &b->copy_len, &b->copy_cap, "\t", 1);
		if (anom)
			sink_copy_escape(&b->copy, &b->copy_len, &b->copy_cap, anom, alen);
		else
			put(&b->copy, &b->copy_len, &b->copy_cap, "\\N", 2);
		put(&b->copy, &b->copy_len, &b->copy_cap, "\n", 1);
		row_add(b, off, ts);
		added++;
		p = nl ? nl + 1 : end;
	}
	return added;
bad:
	b->copy_len = mark; /* the entry's rows so far are dropped: all or nothing */
	b->nrows = nrows0;
	b->bad_entries++;
	return 0;
}

void sink_batch_reset(struct sink_batch *b)
{
	b->copy_len = 0;
	b->nrows = 0;
	b->nentries = 0;
	b->started_ms = 0;
	for (unsigned k = 0; k < HUB_FEED_SHARDS_MAX; k++) {
		for (size_t i = 0; i < b->acks[k].n; i++)
			free(b->acks[k].ids[i]);
		b->acks[k].n = 0;
	}
}

void sink_batch_free(struct sink_batch *b)
{
	sink_batch_reset(b);
	for (unsigned k = 0; k < HUB_FEED_SHARDS_MAX; k++)
		free(b->acks[k].ids);
	free(b->copy);
	free(b->rows);
	memset(b, 0, sizeof(*b));
}
