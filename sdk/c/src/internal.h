/*
 * internal.h - what the parts of libiothub-gw share and do not export: a
 * growable buffer, the hub message parser (msg.c, fuzzed alone) and the
 * outbox with its on-disk spool (outbox.c). Nothing here takes a lock: the
 * gateway (gateway.c) holds its mutex around every outbox call.
 */
#ifndef IOTHUB_GW_INTERNAL_H
#define IOTHUB_GW_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "../include/iothub/gateway.h"

#define GW_HIDDEN __attribute__((visibility("hidden")))

/* ---- buffers (allocation failure aborts) ---- */
struct gbuf {
	char *data;
	size_t len, cap;
};
GW_HIDDEN void *gw_xmalloc(size_t n);
GW_HIDDEN void *gw_xcalloc(size_t n, size_t m);
GW_HIDDEN void *gw_xrealloc(void *p, size_t n);
GW_HIDDEN char *gw_xstrdup(const char *s);
GW_HIDDEN void gbuf_add(struct gbuf *b, const void *p, size_t n);
GW_HIDDEN void gbuf_puts(struct gbuf *b, const char *s);
GW_HIDDEN void gbuf_printf(struct gbuf *b, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
GW_HIDDEN void gbuf_free(struct gbuf *b);
GW_HIDDEN int64_t gw_now_ms(void);     /* wall clock */
GW_HIDDEN int64_t gw_mono_ms(void);
GW_HIDDEN int gw_valid_id(const char *s);   /* [A-Za-z0-9._:-]{1,128} */
GW_HIDDEN uint32_t gw_crc32(const void *p, size_t n);

/* ---- hub -> gateway messages (msg.c) ---- */
enum gwm_type {
	GWM_OTHER = 0,      /* a type this library does not know: ignored */
	GWM_ACK,
	GWM_ANNOUNCED,
	GWM_ERROR,
	GWM_COMMAND,
	GWM_CANCEL,
};

struct gwm {
	enum gwm_type type;
	json_t *root;           /* owned: gwm_free() */
	int has_seq;
	uint64_t seq;
	int64_t accepted;
	int duplicate;
	json_t *rejected;       /* borrowed array (ack, announced) or NULL */
	const char *code;       /* error */
	const char *message;
	int64_t retry_after_ms; /* -1: none */
	const char *id, *device, *name;  /* command, cancel, error with id */
	json_t *params;         /* borrowed or NULL */
	int attempt;
	int64_t expires_at;
};

/* Parses one text message from the hub. Returns 0 (m filled, free it with
 * gwm_free()), or -1 with a message (128 bytes) in err: not JSON, not an
 * object, no string type, or a known type with members of the wrong type. */
GW_HIDDEN int gwm_parse(struct gwm *m, const char *buf, size_t len, char *err, size_t errlen);
GW_HIDDEN void gwm_free(struct gwm *m);

/* ---- the outbox (outbox.c) ---- */
struct ob_reading {
	uint64_t rid;
	char *json;             /* {"device":..,"ts":..,"data":..}, compact */
	size_t len;
};

enum { FR_UNSENT = 0, FR_INFLIGHT, FR_ACKED };

struct ob_frame {
	uint64_t seq;
	uint64_t first_rid;
	uint32_t n;
	int state;
	int64_t sent_at;        /* mono ms it went out (FR_INFLIGHT), else 0 */
};

struct outbox {
	char *dir;
	int fd;                 /* the current segment */
	int dirfd;
	uint64_t cur_seg;       /* its number */
	size_t cur_bytes;
	struct ob_seg { uint64_t no; uint64_t end_rid; size_t bytes; } *segs;
	size_t nsegs;           /* closed segments, oldest first */
	size_t total_bytes, max_bytes, seg_bytes;
	enum iothub_gw_fsync fsync;
	int dirty;              /* written since the last fsync */
	uint64_t next_rid, next_seq;
	uint64_t seq_limit;     /* seqs below it may have been used: S record */

	struct ob_reading *rd;  /* unacked readings by rid: rd[rd_head..rd_len) */
	size_t rd_head, rd_len, rd_cap;
	struct ob_frame *fr;    /* unacked frames by seq: fr[fr_head..fr_len) */
	size_t fr_head, fr_len, fr_cap;
	uint64_t framed_end;    /* readings with rid >= this are in no frame */
};

/* Opens (creating) dir and replays its segments: unacked frames (their seq
 * and readings as they were), then the readings in no frame. Returns 0 or
 * IOTHUB_GW_EIO / EINVAL with a message. */
GW_HIDDEN int ob_open(struct outbox *o, const char *dir, size_t max_bytes, size_t seg_bytes,
		      enum iothub_gw_fsync fsync, char *err, size_t errlen);
GW_HIDDEN void ob_close(struct outbox *o);
/* Appends a reading (json, len: compact, no newline). bounded: refuse with
 * IOTHUB_GW_ESPOOL_FULL past max_bytes. */
GW_HIDDEN int ob_append(struct outbox *o, const char *json, size_t len, int bounded,
			char *err, size_t errlen);
/* The number of readings in no frame, and the first one's index in rd. */
GW_HIDDEN size_t ob_unframed(struct outbox *o, size_t *first);
/* Makes a frame of up to max readings / max_bytes of JSON from the unframed
 * ones: writes its F record (fsynced with BATCH or ALWAYS). Returns 0, or
 * -1 when there is nothing to frame or the record could not be written. */
GW_HIDDEN int ob_make_frame(struct outbox *o, size_t max, size_t max_bytes);
/* The frame with this seq, or NULL; and its readings' index in rd. */
GW_HIDDEN struct ob_frame *ob_frame(struct outbox *o, uint64_t seq);
GW_HIDDEN size_t ob_frame_first(struct outbox *o, const struct ob_frame *f);
/* Marks seq acked (A record), drops acked frames at the front with their
 * readings and deletes the segments nothing needs any more. */
GW_HIDDEN void ob_acked(struct outbox *o, uint64_t seq);
GW_HIDDEN int ob_sync(struct outbox *o);
GW_HIDDEN size_t ob_pending(const struct outbox *o);

#endif
