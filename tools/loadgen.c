/*
 * loadgen.c - shared parts of the load clients gw-sim and dash-sub (loadgen.h).
 */

#define _GNU_SOURCE
#include "loadgen.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#define LG_HEARTBEAT_US 10000   /* bound on lws 4.1.6 + libev timer lateness */

int lg_log_level = LOG_WARN;

static const char *lg_prog = "loadgen";
static int64_t lg_t0;

void
lg_init(const char *prog)
{
	lg_prog = prog;
	lg_t0 = lg_mono_us();
}

/* ------------------------------------------------------------------------ */
/* clocks                                                                     */

int64_t
lg_mono_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t
lg_wall_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* ------------------------------------------------------------------------ */
/* logging                                                                    */

void
lg_log_write(int lvl, const char *fmt, ...)
{
	static const char *names[] = { "error", "warn", "info", "debug" };
	static int64_t win_start;
	static unsigned win_lines, suppressed;
	int64_t now = lg_mono_us();
	va_list ap;

	if (lvl > LOG_ERR) {
		if (now - win_start >= 1000000) {
			if (suppressed)
				fprintf(stderr, "[%8.3f] warn: %u log lines "
					"suppressed\n",
					(double)(now - lg_t0) / 1e6, suppressed);
			win_start = now;
			win_lines = 0;
			suppressed = 0;
		}
		if (++win_lines > 20) {
			suppressed++;
			return;
		}
	}
	fprintf(stderr, "[%8.3f] %s: ", (double)(now - lg_t0) / 1e6, names[lvl]);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

int
lg_lws_log_levels(void)
{
	if (lg_log_level <= LOG_ERR)
		return LLL_ERR;
	if (lg_log_level >= LOG_DEBUG)
		return LLL_ERR | LLL_WARN | LLL_NOTICE;
	return LLL_ERR | LLL_WARN;
}

/* ------------------------------------------------------------------------ */
/* allocation                                                                 */

void *
lg_xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (!p) {
		fprintf(stderr, "%s: out of memory (%zu bytes)\n", lg_prog, n);
		abort();
	}
	return p;
}

void *
lg_xcalloc(size_t n, size_t sz)
{
	void *p = calloc(n ? n : 1, sz ? sz : 1);

	if (!p) {
		fprintf(stderr, "%s: out of memory (%zu x %zu bytes)\n", lg_prog,
			n, sz);
		abort();
	}
	return p;
}

void *
lg_xrealloc(void *o, size_t n)
{
	void *p = realloc(o, n ? n : 1);

	if (!p) {
		fprintf(stderr, "%s: out of memory (%zu bytes)\n", lg_prog, n);
		abort();
	}
	return p;
}

char *
lg_xstrdup(const char *s)
{
	size_t n = strlen(s) + 1;

	return memcpy(lg_xmalloc(n), s, n);
}

/* ------------------------------------------------------------------------ */
/* command line                                                               */

void
lg_die_flag(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "%s: ", lg_prog);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs(" (see --help)\n", stderr);
	exit(2);
}

double
lg_parse_num(const char *flag, const char *s, double lo, double hi)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi)
		lg_die_flag("%s: expected a number in [%g, %g], got '%s'", flag,
			    lo, hi, s);
	return v;
}

uint64_t
lg_parse_u64(const char *flag, const char *s, uint64_t lo, uint64_t hi)
{
	char *end;
	unsigned long long v;

	errno = 0;
	if (!*s || *s == '-' || isspace((unsigned char)*s))
		lg_die_flag("%s: expected an integer in [%" PRIu64 ", %" PRIu64
			    "], got '%s'", flag, lo, hi, s);
	v = strtoull(s, &end, 10);
	if (errno || *end || v < lo || v > hi)
		lg_die_flag("%s: expected an integer in [%" PRIu64 ", %" PRIu64
			    "], got '%s'", flag, lo, hi, s);
	return v;
}

char *
lg_url_host(const char *url, const char *h, const char *pe, const char **rest)
{
	const char *e;
	char *host;

	if (*h == '[') {
		e = memchr(h, ']', (size_t)(pe - h));
		if (!e)
			lg_die_flag("--url: unterminated [ in '%s'", url);
		host = strndup(h + 1, (size_t)(e - h - 1));
		e++;
	} else {
		e = memchr(h, ':', (size_t)(pe - h));
		if (!e)
			e = pe;
		host = strndup(h, (size_t)(e - h));
	}
	if (!host)
		abort();
	*rest = e;
	return host;
}

double
lg_parse_stats_interval(const char *s)
{
	double v = lg_parse_num("--stats-interval", s, 0, 86400);

	if (v > 0 && v < 0.01)
		lg_die_flag("--stats-interval: at least 0.01 s");
	return v;
}

void
lg_common_option(int o, char **argv, void (*usage)(FILE *))
{
	switch (o) {
	case 'v':
		lg_log_level = lg_log_level < LOG_INFO ? LOG_INFO : LOG_DEBUG;
		break;
	case 'q':
		lg_log_level = LOG_ERR;
		break;
	case 'h':
		usage(stdout);
		exit(0);
	case ':':
		lg_die_flag("option '%s' needs a value", argv[optind - 1]);
	default:
		lg_die_flag("unknown option '%s'", argv[optind - 1]);
	}
}

char *
lg_host_header(const char *host, int port)
{
	size_t n = strlen(host) + 16;
	char *hdr = lg_xmalloc(n);
	int v6 = strchr(host, ':') != NULL;

	if (port)
		snprintf(hdr, n, v6 ? "[%s]:%d" : "%s:%d", host, port);
	else
		snprintf(hdr, n, v6 ? "[%s]" : "%s", host);
	return hdr;
}

/* ------------------------------------------------------------------------ */
/* latency histogram                                                          */

static unsigned
hist_index(uint64_t v)
{
	unsigned e, shift;

	if (v < LG_HIST_SUB)
		return (unsigned)v;
	e = 63u - (unsigned)__builtin_clzll(v);
	if (e >= LG_HIST_MAX_EXP)
		return LG_HIST_BUCKETS - 1;
	shift = e - LG_HIST_SUB_BITS;
	return LG_HIST_SUB + shift * LG_HIST_SUB +
	       (unsigned)((v >> shift) - LG_HIST_SUB);
}

/* highest value that lands in bucket idx */
static uint64_t
hist_bucket_top(unsigned idx)
{
	unsigned shift, m;

	if (idx < LG_HIST_SUB)
		return idx;
	shift = (idx - LG_HIST_SUB) / LG_HIST_SUB;
	m = (idx - LG_HIST_SUB) % LG_HIST_SUB + LG_HIST_SUB;
	return (((uint64_t)m + 1) << shift) - 1;
}

void
lg_hist_add(struct lg_hist *h, uint64_t v)
{
	h->b[hist_index(v)]++;
	h->count++;
	h->sum += (double)v;
	if (v > h->max)
		h->max = v;
}

void
lg_hist_reset(struct lg_hist *h)
{
	memset(h, 0, sizeof(*h));
}

uint64_t
lg_hist_quantile(const struct lg_hist *h, double q)
{
	uint64_t rank, seen = 0, v;
	unsigned i;

	if (!h->count)
		return 0;
	rank = (uint64_t)ceil(q * (double)h->count);
	if (rank < 1)
		rank = 1;
	for (i = 0; i < LG_HIST_BUCKETS; i++) {
		seen += h->b[i];
		if (seen >= rank) {
			v = hist_bucket_top(i);
			return v < h->max ? v : h->max;
		}
	}
	return h->max;
}

double
lg_hist_mean(const struct lg_hist *h)
{
	return h->count ? h->sum / (double)h->count : 0.0;
}

/* ------------------------------------------------------------------------ */
/* connect-rate limiter                                                       */

void
lg_bucket_init(struct lg_bucket *b, double rate, int64_t now_us)
{
	b->rate = rate;
	b->tokens = 1;
	b->at_us = now_us;
}

void
lg_bucket_refill(struct lg_bucket *b, int64_t now_us)
{
	double burst = b->rate * 0.02;

	if (burst < 1)
		burst = 1;
	b->tokens += (double)(now_us - b->at_us) * b->rate / 1e6;
	if (b->tokens > burst)
		b->tokens = burst;
	b->at_us = now_us;
}

int
lg_bucket_take(struct lg_bucket *b)
{
	if (b->tokens < 1.0)
		return 0;
	b->tokens -= 1.0;
	return 1;
}

double
lg_bucket_wait_us(const struct lg_bucket *b)
{
	return (1.0 - b->tokens) / b->rate * 1e6;
}

/* ------------------------------------------------------------------------ */
/* process limits and CPU                                                     */

int
lg_raise_nofile(const char *flag, unsigned n)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl))
		return 0;
	if (rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl))
			LOG(LOG_WARN, "cannot raise RLIMIT_NOFILE: %s",
			    strerror(errno));
		getrlimit(RLIMIT_NOFILE, &rl);
	}
	if (rl.rlim_cur != RLIM_INFINITY &&
	    (uint64_t)n + 64 > (uint64_t)rl.rlim_cur) {
		fprintf(stderr, "%s: %s %u needs about %u open files, the limit "
			"is %llu\n", lg_prog, flag, n, n + 64,
			(unsigned long long)rl.rlim_cur);
		return -1;
	}
	return 0;
}

double
lg_tv_s(struct timeval t)
{
	return (double)t.tv_sec + (double)t.tv_usec / 1e6;
}

/* ------------------------------------------------------------------------ */
/* lws client context                                                         */

void
lg_context_info(struct lws_context_creation_info *info,
		const struct lws_protocols *protocols)
{
	memset(info, 0, sizeof(*info));
	info->port = CONTEXT_PORT_NO_LISTEN;
	info->protocols = protocols;
	info->options = LWS_SERVER_OPTION_LIBEV;
	info->gid = -1;
	info->uid = -1;
	info->timeout_secs = 10;
	/* no fd_limit_per_thread: in lws 4.1.6 setting it turns the fd -> wsi
	 * lookup into a linear search (35 % of the CPU at 3,000 connections);
	 * the default sizes the table from RLIMIT_NOFILE (lg_raise_nofile) */
}

void
lg_endpoint_free(struct lg_endpoint *ep)
{
	free(ep->host);
	free(ep->host_hdr);
	free(ep->path);
	memset(ep, 0, sizeof(*ep));
}

/*
 * No lws validity (idle PING) timer on client connections. In lws 4.1.6 every
 * connection otherwise gets the context's default policy (PING after 300 s):
 * a sul inserted into one sorted list when the connection is established,
 * at the far end of it, so each insert walks all the others. At 18,000
 * connections that walk was 72 % of gw-sim's CPU and held the connect ramp to
 * ~1,500 connections/s (perf, lws_dll2_add_sorted). A policy with
 * secs_since_valid_hangup 0 makes lws skip the timer; the tools do not need
 * it (the hub PINGs gateways, --mqtt sends its own PINGREQs).
 */
static const lws_retry_bo_t lg_no_idle_policy = { 0 };

void
lg_connect_info(struct lws_client_connect_info *ci, struct lws_context *ctx,
		const struct lg_endpoint *ep, const char *proto, void *opaque,
		struct lws **pwsi)
{
	memset(ci, 0, sizeof(*ci));
	ci->retry_and_idle_policy = &lg_no_idle_policy;
	ci->context = ctx;
	ci->address = ep->host;
	ci->port = ep->port;
	ci->path = ep->path;
	ci->host = ep->host_hdr;
	ci->protocol = proto;
	ci->local_protocol_name = proto;
	ci->opaque_user_data = opaque;
	ci->pwsi = pwsi;
}

void *
lg_client_owner(struct lws *wsi, enum lws_callback_reasons reason)
{
	switch (reason) {
	case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER:
	case LWS_CALLBACK_CLIENT_CONNECTION_ERROR:
	case LWS_CALLBACK_CLIENT_ESTABLISHED:
	case LWS_CALLBACK_CLIENT_RECEIVE:
	case LWS_CALLBACK_CLIENT_WRITEABLE:
	case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
	case LWS_CALLBACK_CLIENT_CLOSED:
	case LWS_CALLBACK_WSI_DESTROY:
		return wsi ? lws_get_opaque_user_data(wsi) : NULL;
	default:
		return NULL;
	}
}

int
lg_rx_feed(struct lg_rx *rx, const char *in, size_t len, int final,
	   size_t max, const char **msg, size_t *n)
{
	if (!rx->len && final) {
		*msg = in;
		*n = len;
		return 1;
	}
	if (rx->len + len > max) {
		rx->len = 0;
		return -1;
	}
	if (rx->len + len > rx->cap) {
		size_t nc = rx->cap ? rx->cap : 1024;

		while (nc < rx->len + len)
			nc *= 2;
		if (nc > max)
			nc = max;
		rx->buf = lg_xrealloc(rx->buf, nc);
		rx->cap = nc;
	}
	memcpy(rx->buf + rx->len, in, len);
	rx->len += len;
	if (!final)
		return 0;
	*msg = rx->buf;
	*n = rx->len;
	rx->len = 0;
	return 1;
}

static struct {
	struct lws_context *ctx;
	int stopped;
	lws_sorted_usec_list_t sul;
} hb;

/* runs from the ev timer's own callback, where lws re-arms the timer right */
static void
heartbeat_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	if (!hb.stopped)
		lws_sul_schedule(hb.ctx, 0, &hb.sul, heartbeat_cb,
				 LG_HEARTBEAT_US);
}

void
lg_heartbeat_start(struct lws_context *ctx)
{
	hb.ctx = ctx;
	hb.stopped = 0;
	lws_sul_schedule(ctx, 0, &hb.sul, heartbeat_cb, LG_HEARTBEAT_US);
}

void
lg_heartbeat_stop(void)
{
	hb.stopped = 1;
	lws_sul_cancel(&hb.sul);
}

static struct {
	struct lws_context *ctx;
	int stopped;
	lws_usec_t interval_us;
	void (*print)(int64_t now_us);
	lws_sorted_usec_list_t sul;
} st;

static void
stats_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	st.print(lg_mono_us());
	if (!st.stopped)
		lws_sul_schedule(st.ctx, 0, &st.sul, stats_cb, st.interval_us);
}

void
lg_stats_start(struct lws_context *ctx, double interval_s,
	       void (*print)(int64_t now_us))
{
	st.ctx = ctx;
	st.stopped = 0;
	st.interval_us = (lws_usec_t)(interval_s * 1e6);
	st.print = print;
	lws_sul_schedule(ctx, 0, &st.sul, stats_cb, st.interval_us);
}

void
lg_stats_stop(void)
{
	st.stopped = 1;
	lws_sul_cancel(&st.sul);
}

static struct lws_context *volatile sig_ctx;
static volatile sig_atomic_t sig_count;

static void
on_signal(int sig)
{
	struct lws_context *ctx = sig_ctx;

	(void)sig;
	sig_count++;
	if (ctx)
		lws_cancel_service(ctx);
}

void
lg_signals_install(struct lws_context *ctx)
{
	struct sigaction sa;

	sig_ctx = ctx;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
}

void
lg_signals_detach(void)
{
	sig_ctx = NULL;
}

int
lg_signal_count(void)
{
	return sig_count;
}

void
lg_run(struct lws_context *ctx, const int *done)
{
	lws_cancel_service(ctx);
	while (!*done)
		if (lws_service(ctx, 0) < 0)
			break;
	lg_signals_detach();
	lws_context_destroy(ctx);
}

size_t lg_mqtt_varint(unsigned char *o, size_t v)
{
	size_t n = 0;

	do {
		unsigned char b = (unsigned char)(v % 128);

		v /= 128;
		o[n++] = v ? (unsigned char)(b | 0x80) : b;
	} while (v);
	return n;
}

size_t lg_mqtt_connect(unsigned char *o, const char *id, size_t idl, unsigned keepalive_s)
{
	size_t n = 0;

	o[n++] = 0x10;
	n += lg_mqtt_varint(o + n, 10 + 2 + idl);
	memcpy(o + n, "\0\4MQTT\4\2", 8);   /* protocol name, level 4, clean session */
	n += 8;
	o[n++] = (unsigned char)(keepalive_s >> 8);
	o[n++] = (unsigned char)(keepalive_s & 0xff);
	o[n++] = (unsigned char)(idl >> 8);
	o[n++] = (unsigned char)(idl & 0xff);
	memcpy(o + n, id, idl);
	return n + idl;
}
