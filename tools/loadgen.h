/*
 * loadgen.h - what the two load clients, gw-sim and dash-sub, share beyond
 * their connections (which run on client.h): rate-limited logging, the
 * options both take and their parsing, the latency histogram, the
 * connect-rate token bucket, RLIMIT_NOFILE, the --stats-interval timer, and
 * MQTT 3.1.1 framing for their --mqtt modes.
 *
 * One load client per process, one thread: the log level, the program name
 * and the stats timer are process-wide. Everything here may be called from
 * the client layer's callbacks, except lg_parse() and lg_raise_nofile()
 * (start-up).
 */
#ifndef LOADGEN_H
#define LOADGEN_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/time.h>

#include "hub/opts.h"
#include "hub/util.h"
#include "tools/client.h"

/* Names the program in messages ("gw-sim: ...") and starts the log clock.
 * Call first in main(); prog must outlive the process (a literal). */
void lg_init(const char *prog);

/* ------------------------------------------------------------------------ */
/* logging                                                                    */

enum { LOG_ERR, LOG_WARN, LOG_INFO, LOG_DEBUG };

/* Threshold: LOG_WARN unless -v or -q change it. */
extern int lg_log_level;

#define LOG(lvl, ...)                                                         \
	do {                                                                  \
		if ((lvl) <= lg_log_level)                                    \
			lg_log_write((lvl), __VA_ARGS__);                     \
	} while (0)

/* One "[seconds since lg_init] level: text" line on stderr. Lines other than
 * errors are limited to 20 a second (thousands of connections failing at once
 * must not flood stderr); the number suppressed is reported. */
void lg_log_write(int lvl, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* Routes lws's own log lines into LOG() ("lws: ..."), at the level -v/-q
 * chose: errors only with -q, notices only at debug (the ev backend logs a
 * notice per event-loop io change). Call after lg_parse(). */
void lg_lws_logs(void);

/* ------------------------------------------------------------------------ */
/* command line                                                               */

int lg_opt_verbose(void *obj, const struct opt *o, const char *val, char *err, size_t errlen);
int lg_opt_quiet(void *obj, const struct opt *o, const char *val, char *err, size_t errlen);
int lg_opt_stats(void *obj, const struct opt *o, const char *val, char *err, size_t errlen);

/* The rows every load client's table ends with: --stats-interval S (0 off,
 * else 0.01 to 86400 s, into the double field f of struct T), -v/--verbose
 * (again: debug), -q/--quiet. */
#define LG_OPTS(T, f)                                                         \
	{ "stats-interval", OPT_DBL, offsetof(T, f), "0", 0, 86400,          \
	  "one stats line per S seconds on stderr (0 = off)", "S", 0,        \
	  lg_opt_stats, NULL },                                               \
	{ "verbose", OPT_FLAG, OPT_NO_FIELD, NULL, 0, 0,                      \
	  "more logs (twice: debug and lws notices)", NULL, 'v',             \
	  lg_opt_verbose, NULL },                                             \
	{ "quiet", OPT_FLAG, OPT_NO_FIELD, NULL, 0, 0, "errors only", NULL,   \
	  'q', lg_opt_quiet, NULL }

/*
 * Sets obj's defaults and parses argv with table t. -h/--help prints head,
 * the table and "-h, --help" on stdout and exits 0; a bad flag or any
 * non-option argument prints "PROG: <why>" and exits 2.
 */
void lg_parse(const struct opt *t, size_t n, void *obj, int argc, char **argv,
	      const char *head);

/* ------------------------------------------------------------------------ */
/* latency histogram                                                          */

/* Log-linear (HDR style): 128 linear sub-buckets per power of two (relative
 * error < 0.8 %), values (microseconds) up to 2^40, larger ones in the last
 * bucket. A plain value (no allocation): embed it, memset or lg_hist_reset()
 * it to empty it. */
#define LG_HIST_SUB_BITS 7u
#define LG_HIST_SUB      (1u << LG_HIST_SUB_BITS)
#define LG_HIST_MAX_EXP  40u
#define LG_HIST_BUCKETS  (LG_HIST_SUB + (LG_HIST_MAX_EXP - LG_HIST_SUB_BITS) * \
			  LG_HIST_SUB)

struct lg_hist {
	uint64_t count;
	uint64_t max;          /* exact */
	double sum;
	uint64_t b[LG_HIST_BUCKETS];
};

void lg_hist_add(struct lg_hist *h, uint64_t v);
void lg_hist_reset(struct lg_hist *h);

/* Value at quantile q (0..1]: the top of its bucket, never above the exact
 * max; 0 when empty. */
uint64_t lg_hist_quantile(const struct lg_hist *h, double q);

/* Mean, 0 when empty. */
double lg_hist_mean(const struct lg_hist *h);

/* ------------------------------------------------------------------------ */
/* counts by name                                                             */

/* Error codes a peer sent, counted by name: the first LG_CODES names apart,
 * the rest (and names of 32 bytes or more) together as "(other)", the last
 * entry. A plain value: zero it to empty it. */
#define LG_CODES 16
struct lg_codes {
	char name[LG_CODES + 1][32];
	uint64_t n[LG_CODES + 1];
	unsigned len;              /* names in use, "(other)" not counted */
};

void lg_codes_add(struct lg_codes *c, const char *name, size_t len);

/* ------------------------------------------------------------------------ */
/* connect-rate limiter                                                       */

/* A token bucket of rate tokens a second holding at most 20 ms of them (and
 * at least one). */
struct lg_bucket {
	double rate;
	double tokens;
	int64_t at_us;         /* hub_mono_us() of the last refill */
};

/* Starts with one token, so the first connection goes at once. */
void lg_bucket_init(struct lg_bucket *b, double rate, int64_t now_us);

/* Adds the tokens earned since the last refill. Once per pump: a loop that
 * refilled before every take would never end while each connect costs more
 * than a token's worth of time. */
void lg_bucket_refill(struct lg_bucket *b, int64_t now_us);

/* Takes one token: 1 if there was one, else 0. */
int lg_bucket_take(struct lg_bucket *b);

/* Microseconds until the next token (<= 0: one is there). */
double lg_bucket_wait_us(const struct lg_bucket *b);

/* ------------------------------------------------------------------------ */
/* process                                                                    */

/* Raises RLIMIT_NOFILE to its hard limit. Returns 0, or -1 after saying on
 * stderr that "flag n" needs more open files than allowed (the caller exits). */
int lg_raise_nofile(const char *flag, unsigned n);

/* A struct timeval in seconds. */
double lg_tv_s(struct timeval t);

/* --stats-interval: print(hub_mono_us()) every interval_s seconds from the
 * loop of x until lg_stats_stop(); the tool prints the last line itself. */
void lg_stats_start(struct hc_ctx *x, double interval_s, void (*print)(int64_t now_us));
void lg_stats_stop(void);

/* ------------------------------------------------------------------------ */
/* MQTT 3.1.1 (gw-sim --mqtt, dash-sub --mqtt)                                */

/* The remaining-length varint (7 bits a byte, low first) into o; its size. */
size_t lg_mqtt_varint(unsigned char *o, size_t v);

/* A CONNECT packet (level 4, clean session, keepalive_s, client id
 * id[0..idl)) into o; its size. */
size_t lg_mqtt_connect(unsigned char *o, const char *id, size_t idl, unsigned keepalive_s);

/*
 * MQTT packets may span or share WebSocket messages: a byte stream. Feeds
 * in[0..len) (parsed where it lies when nothing is pending; only a packet's
 * unfinished start is kept in rx) and calls pkt(ctx, first byte, body, body
 * length) for each whole packet. Returns 0, or -1 when the stream cannot be
 * followed (a length over 4 bytes, or a packet over max): rx is then emptied.
 */
int lg_mqtt_feed(hub_buf *rx, const unsigned char *in, size_t len, size_t max,
		 void (*pkt)(void *ctx, unsigned b0, const unsigned char *b, size_t n),
		 void *ctx);

#endif
