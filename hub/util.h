/*
 * util.h - small helpers shared by the hub's modules: clocks, id checks, hex,
 * JSON string escaping, a growable byte buffer. No libwebsockets here.
 */
#ifndef HUB_UTIL_H
#define HUB_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define HUB_ID_MAX 128

/* Wall clock in milliseconds / microseconds since the epoch. */
int64_t hub_now_ms(void);
int64_t hub_now_us(void);
/* Monotonic clock in microseconds. */
int64_t hub_mono_us(void);

/* True if s[0..len) matches [A-Za-z0-9._:-]{1,128} (device, gateway and
 * device-type ids: docs/protocol.md "Conventions"). */
bool hub_id_valid(const char *s, size_t len);

/* Strict decimal integer: s[0..len) is an optional '-' and decimal digits,
 * nothing else (no '+', no spaces, no hex), in [min, max]. Returns 0 and
 * sets *out, or -1 (empty, junk, overflow, out of range); *out is then left
 * alone. For numbers from a peer (query parameters). */
int hub_parse_i64(const char *s, size_t len, int64_t min, int64_t max, int64_t *out);
/* The same for a NUL-terminated s (NULL: -1). */
int hub_parse_ll(const char *s, long long min, long long max, long long *out);

/* A Redis stream position "<ms>-<seq>" (or "<ms>" alone unless need_seq):
 * parts of decimal digits only, each at most UINT64_MAX, as Redis reads
 * stream ids. Returns 0 and sets *ms, *seq (0 when absent), or -1. */
int hub_parse_pos(const char *s, size_t len, bool need_seq, uint64_t *ms, uint64_t *seq);

/* The value of hex digit c (0-9, a-f, A-F), or -1. */
int hub_hex_val(int c);
/* Decodes hex[0..len), exactly 2 * n hex digits of either case, into
 * out[0..n). Returns 0, or -1 (wrong length, NULL hex, a non-hex digit; out
 * may then be partly written). */
int hub_unhex(const char *hex, size_t len, uint8_t *out, size_t n);

/* Growable byte buffer. Aborts with a message on OOM (internal failure). */
typedef struct hub_buf {
	char *data;
	size_t len, cap;
} hub_buf;

void hub_buf_reserve(hub_buf *b, size_t extra);
void hub_buf_append(hub_buf *b, const void *p, size_t n);
void hub_buf_puts(hub_buf *b, const char *s);
void hub_buf_printf(hub_buf *b, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));
/* Appends the decimal text of v (no printf: it is on the per-frame path). */
void hub_buf_i64(hub_buf *b, int64_t v);
/* Decimal text of v into out (room for 21 bytes; no NUL); returns its length. */
size_t hub_fmt_i64(char *out, int64_t v);
/* v as a plain decimal with at most 8 fraction digits ("21.5", "-0.125",
 * "40") that reads back (strtod) as exactly v, into out (>= 32 bytes); 0 when
 * v has no such form (then use %.17g). No printf: the fast path for
 * sensor-like values. */
size_t hub_fmt_decimal(char *out, double v);
/* Appends s[0..n) as a JSON string literal, quotes included. */
void hub_buf_json_str(hub_buf *b, const char *s, size_t n);
void hub_buf_free(hub_buf *b);

/* malloc/calloc/strdup that abort on OOM. */
void *hub_xmalloc(size_t n);
void *hub_xcalloc(size_t n, size_t sz);
void *hub_xrealloc(void *p, size_t n);
char *hub_xstrdup(const char *s);

/* Reads a whole file (at most max bytes) into a NUL-terminated heap buffer.
 * Returns NULL with errno set (EFBIG when over max). */
char *hub_read_file(const char *path, size_t max, size_t *len_out);

#endif
