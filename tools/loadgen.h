/*
 * loadgen.h - what the two lws load clients, gw-sim and dash-sub, share: clocks,
 * rate-limited logging, allocation that aborts, option parsing, the latency
 * histogram, the connect-rate token bucket, RLIMIT_NOFILE, and the lws 4.1.6
 * client-context chores (context options, connect info, the libev heartbeat,
 * SIGINT/SIGTERM).
 *
 * One load client per process, one thread: the log level, the program name, the
 * heartbeat and the signal count are process-wide. Nothing here may be called
 * from a signal handler; everything else may be called from lws callbacks.
 */
#ifndef LOADGEN_H
#define LOADGEN_H

#include <libwebsockets.h>

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/time.h>

/* ------------------------------------------------------------------------ */
/* start-up                                                                   */

/* Names the program in fatal messages ("gw-sim: ...") and starts the log clock.
 * Call first in main(); prog must outlive the process (a literal). */
void lg_init(const char *prog);

/* ------------------------------------------------------------------------ */
/* clocks                                                                     */

/* CLOCK_MONOTONIC in microseconds: intervals and timers. */
int64_t lg_mono_us(void);

/* CLOCK_REALTIME in microseconds: stamps compared across processes. */
int64_t lg_wall_us(void);

/* ------------------------------------------------------------------------ */
/* logging                                                                    */

/* The tools' level names; LOG() is the level-checked entry point. The short
 * names predate this header and are used at every call site of both tools. */
enum { LOG_ERR, LOG_WARN, LOG_INFO, LOG_DEBUG };

/* Threshold: LOG_WARN unless the command line changes it. */
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

/* The lws_set_log_level() mask for lg_log_level: errors only with -q, notices
 * only at debug (the ev backend logs a notice per event-loop io change). */
int lg_lws_log_levels(void);

/* ------------------------------------------------------------------------ */
/* allocation: out of memory aborts with a message; 0 bytes is 1 byte         */

void *lg_xmalloc(size_t n);
void *lg_xcalloc(size_t n, size_t sz);
void *lg_xrealloc(void *o, size_t n);
char *lg_xstrdup(const char *s);

/* ------------------------------------------------------------------------ */
/* command line                                                               */

/* "PROG: <message> (see --help)" on stderr, then exit(2). */
void lg_die_flag(const char *fmt, ...)
	__attribute__((format(printf, 1, 2), noreturn));

/* s as a finite number in [lo, hi], else lg_die_flag() naming flag. */
double lg_parse_num(const char *flag, const char *s, double lo, double hi);

/* s as a decimal integer in [lo, hi] (no sign, no space), else lg_die_flag(). */
uint64_t lg_parse_u64(const char *flag, const char *s, uint64_t lo, uint64_t hi);

/*
 * The host of a ws:// or wss:// --url: h is the first byte after the scheme,
 * pe the end of the authority. A [v6] literal loses its brackets. Returns the
 * host (the caller frees it) and sets *rest to the byte after it: ':' before a
 * port, or pe. An unterminated '[' is lg_die_flag().
 */
char *lg_url_host(const char *url, const char *h, const char *pe,
		  const char **rest);

/* --stats-interval S: 0 (off) or 0.01 to 86400 seconds, else lg_die_flag(). */
double lg_parse_stats_interval(const char *s);

/*
 * The options every tool takes, for getopt_long() with opterr = 0 and an
 * optstring starting ":vqh": -v/--verbose (info, again: debug), -q/--quiet
 * (errors only), -h/--help (usage(stdout), exit 0); ':' (a value missing) and
 * anything else (unknown option) are lg_die_flag(). Call it from the default
 * case of the tool's own switch.
 */
void lg_common_option(int o, char **argv, void (*usage)(FILE *));

/* The Host: header for host and port ("[v6]:port" for an IPv6 literal), no
 * port when port is 0; the caller frees it. */
char *lg_host_header(const char *host, int port);

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
/* connect-rate limiter                                                       */

/* A token bucket of rate tokens a second holding at most 20 ms of them (and
 * at least one). */
struct lg_bucket {
	double rate;
	double tokens;
	int64_t at_us;         /* lg_mono_us() of the last refill */
};

/* Starts with one token, so the first connection goes at once. */
void lg_bucket_init(struct lg_bucket *b, double rate, int64_t now_us);

/* Adds the tokens earned since the last refill. */
void lg_bucket_refill(struct lg_bucket *b, int64_t now_us);

/* Takes one token: 1 if there was one, else 0. */
int lg_bucket_take(struct lg_bucket *b);

/* Microseconds until the next token (<= 0: one is there). */
double lg_bucket_wait_us(const struct lg_bucket *b);

/* ------------------------------------------------------------------------ */
/* process limits and CPU                                                     */

/* Raises RLIMIT_NOFILE to its hard limit. Returns 0, or -1 after saying on
 * stderr that "flag n" needs more open files than allowed (the caller exits). */
int lg_raise_nofile(const char *flag, unsigned n);

/* A struct timeval in seconds. */
double lg_tv_s(struct timeval t);

/* ------------------------------------------------------------------------ */
/* lws client context                                                         */

/* Zeroes info and fills in what both tools use: no listener, protocols, the
 * libev backend, 10 s timeouts. The caller adds TLS and creates the context. */
void lg_context_info(struct lws_context_creation_info *info,
		     const struct lws_protocols *protocols);

/* The part of a connection target that comes from --url. */
struct lg_endpoint {
	char *host;            /* address to connect to (no brackets) */
	char *host_hdr;        /* Host: header value */
	char *path;            /* begins with '/' */
	int port;
};

/* Frees the endpoint's strings (NULL-safe) and clears it. */
void lg_endpoint_free(struct lg_endpoint *ep);

/* Zeroes ci and fills in a client connection to ep with subprotocol proto;
 * lws will store the wsi in *pwsi and hand back opaque from
 * lws_get_opaque_user_data(). */
void lg_connect_info(struct lws_client_connect_info *ci, struct lws_context *ctx,
		     const struct lg_endpoint *ep, const char *proto,
		     void *opaque, struct lws **pwsi);

/*
 * The connection object (the connect info's opaque) that a client callback is
 * about, or NULL: for the reasons the tools do not handle, and for lws-internal
 * wsis. The caller still checks that the wsi is the connection's current one.
 */
void *lg_client_owner(struct lws *wsi, enum lws_callback_reasons reason);

/* A message arriving in fragments (CLIENT_RECEIVE). Zeroed is empty; free buf. */
struct lg_rx {
	char *buf;
	size_t len, cap;
};

/*
 * Feeds one CLIENT_RECEIVE: returns 1 with the whole message in *msg and *n
 * (an unfragmented one stays in place in `in`; either dies when the callback
 * returns), 0 while fragments are missing, -1 when the fragments so far would
 * be over max bytes: what was kept is dropped (the caller decides what to do
 * with the rest of that message).
 */
int lg_rx_feed(struct lg_rx *rx, const char *in, size_t len, int final,
	       size_t max, const char **msg, size_t *n);

/*
 * The 10 ms heartbeat. In lws 4.1.6 the libev glue re-arms its timer with
 * ev_timer_set() + ev_timer_start() on a watcher that is still active after
 * an fd event, which libev ignores: a sul scheduled from a socket callback,
 * earlier than the timer already armed, fired up to 10 s late (measured). Only
 * the timer's own callback re-arms it correctly, so a sul that reschedules
 * itself every 10 ms bounds every timer's lateness to 10 ms.
 * Start it once the context exists; stop it before destroying the context.
 */
void lg_heartbeat_start(struct lws_context *ctx);
void lg_heartbeat_stop(void);

/* --stats-interval: print(lg_mono_us()) every interval_s seconds from the loop
 * until lg_stats_stop(); the tool prints the last line itself at the end. */
void lg_stats_start(struct lws_context *ctx, double interval_s,
		    void (*print)(int64_t now_us));
void lg_stats_stop(void);

/*
 * SIGINT and SIGTERM: the handler only counts and wakes the loop with
 * lws_cancel_service(), which lws reports as LWS_CALLBACK_EVENT_WAIT_CANCELLED;
 * the tool compares lg_signal_count() with the count it last handled there.
 * Install after lws_create_context() (the ev backend installs its own SIGINT
 * watcher); lg_signals_detach() before the context is destroyed.
 */
void lg_signals_install(struct lws_context *ctx);
void lg_signals_detach(void);
int lg_signal_count(void);

/*
 * Runs the loop: wakes it once, because lws_sul_schedule() does not arm the
 * libev timer by itself (fd events and sul callbacks do), so the timers
 * scheduled before this call would wait for the first fd event; services ctx
 * until *done (a sul sets it, then calls lws_context_destroy(), which lws
 * defers while inside the service) or lws fails; then lg_signals_detach() and
 * destroys ctx.
 */
void lg_run(struct lws_context *ctx, const int *done);

/* MQTT 3.1.1 (gw-sim --mqtt, dash-sub --mqtt): the remaining-length varint
 * (7 bits a byte, low first) into o, its size; and a CONNECT packet (level
 * 4, clean session, keepalive_s, client id id[0..idl)) into o, its size. */
size_t lg_mqtt_varint(unsigned char *o, size_t v);
size_t lg_mqtt_connect(unsigned char *o, const char *id, size_t idl, unsigned keepalive_s);

#endif
