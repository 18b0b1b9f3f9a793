/*
 * loadgen.c - what the load clients gw-sim and dash-sub share (loadgen.h).
 */

#define _GNU_SOURCE
#include "tools/loadgen.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

int lg_log_level = LOG_WARN;

static const char *lg_prog = "loadgen";
static int64_t lg_t0;

void lg_init(const char *prog)
{
	lg_prog = prog;
	lg_t0 = hub_mono_us();
}

/* ------------------------------------------------------------------------ */
/* logging                                                                    */

void lg_log_write(int lvl, const char *fmt, ...)
{
	static const char *names[] = { "error", "warn", "info", "debug" };
	static int64_t win_start;
	static unsigned win_lines, suppressed;
	int64_t now = hub_mono_us();
	va_list ap;

	if (lvl > LOG_ERR) {
		if (now - win_start >= 1000000) {
			if (suppressed)
				fprintf(stderr, "[%8.3f] warn: %u log lines suppressed\n",
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

static void lws_log_emit(int level, const char *line)
{
	size_t n = strlen(line);

	while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
		n--;
	LOG(level == LLL_ERR ? LOG_ERR : LOG_WARN, "lws: %.*s", (int)n, line);
}

void lg_lws_logs(void)
{
	lws_set_log_level(lg_log_level <= LOG_ERR ? LLL_ERR :
			  lg_log_level >= LOG_DEBUG ? LLL_ERR | LLL_WARN | LLL_NOTICE :
			  LLL_ERR | LLL_WARN, lws_log_emit);
}

/* ------------------------------------------------------------------------ */
/* command line                                                               */

int lg_opt_verbose(void *obj, const struct opt *o, const char *val, char *err, size_t errlen)
{
	lg_log_level = lg_log_level < LOG_INFO ? LOG_INFO : LOG_DEBUG;
	return 0;
}

int lg_opt_quiet(void *obj, const struct opt *o, const char *val, char *err, size_t errlen)
{
	lg_log_level = LOG_ERR;
	return 0;
}

int lg_opt_stats(void *obj, const struct opt *o, const char *val, char *err, size_t errlen)
{
	double v = *(double *)(void *)((char *)obj + o->off);

	if (v > 0 && v < 0.01) {
		snprintf(err, errlen, "--stats-interval: at least 0.01 s");
		return -1;
	}
	return 0;
}

static struct {
	const char *head;
	const struct opt *t;
	size_t n;
} help;

static void usage(FILE *f)
{
	fputs(help.head, f);
	opts_usage(help.t, help.n, f);
	fprintf(f, "  %-26s this help\n", "-h, --help");
}

void lg_parse(const struct opt *t, size_t n, void *obj, int argc, char **argv,
	      const char *head)
{
	const struct opts_tab tab = { t, n, obj };
	const struct opts_cli cli = { &tab, 1, NULL, NULL, NULL };
	char err[512];
	int i = 1;

	if (opts_defaults(t, n, obj, err, sizeof(err)))
		abort();   /* a table's default is wrong: a bug */
	help.head = head;
	help.t = t;
	help.n = n;
	opts_argv_or_exit(&cli, argc, argv, &i, usage);
}

/* ------------------------------------------------------------------------ */
/* latency histogram                                                          */

static unsigned hist_index(uint64_t v)
{
	unsigned e, shift;

	if (v < LG_HIST_SUB)
		return (unsigned)v;
	e = 63u - (unsigned)__builtin_clzll(v);
	if (e >= LG_HIST_MAX_EXP)
		return LG_HIST_BUCKETS - 1;
	shift = e - LG_HIST_SUB_BITS;
	return LG_HIST_SUB + shift * LG_HIST_SUB + (unsigned)((v >> shift) - LG_HIST_SUB);
}

/* highest value that lands in bucket idx */
static uint64_t hist_bucket_top(unsigned idx)
{
	unsigned shift, m;

	if (idx < LG_HIST_SUB)
		return idx;
	shift = (idx - LG_HIST_SUB) / LG_HIST_SUB;
	m = (idx - LG_HIST_SUB) % LG_HIST_SUB + LG_HIST_SUB;
	return (((uint64_t)m + 1) << shift) - 1;
}

void lg_hist_add(struct lg_hist *h, uint64_t v)
{
	h->b[hist_index(v)]++;
	h->count++;
	h->sum += (double)v;
	if (v > h->max)
		h->max = v;
}

void lg_hist_reset(struct lg_hist *h)
{
	memset(h, 0, sizeof(*h));
}

uint64_t lg_hist_quantile(const struct lg_hist *h, double q)
{
	uint64_t rank, seen = 0, v;

	if (!h->count)
		return 0;
	rank = (uint64_t)ceil(q * (double)h->count);
	if (rank < 1)
		rank = 1;
	for (unsigned i = 0; i < LG_HIST_BUCKETS; i++) {
		seen += h->b[i];
		if (seen >= rank) {
			v = hist_bucket_top(i);
			return v < h->max ? v : h->max;
		}
	}
	return h->max;
}

double lg_hist_mean(const struct lg_hist *h)
{
	return h->count ? h->sum / (double)h->count : 0.0;
}

/* ------------------------------------------------------------------------ */
/* counts by name                                                             */

void lg_codes_add(struct lg_codes *c, const char *name, size_t len)
{
	unsigned i;

	for (i = 0; i < c->len; i++)
		if (strlen(c->name[i]) == len && !memcmp(c->name[i], name, len))
			break;
	if (i == c->len && (i == LG_CODES || len >= sizeof(c->name[0])))
		i = LG_CODES;
	if (i == c->len && i < LG_CODES) {
		memcpy(c->name[i], name, len);
		c->len++;
	}
	snprintf(c->name[LG_CODES], sizeof(c->name[0]), "(other)");
	c->n[i]++;
}

/* ------------------------------------------------------------------------ */
/* connect-rate limiter                                                       */

void lg_bucket_init(struct lg_bucket *b, double rate, int64_t now_us)
{
	b->rate = rate;
	b->tokens = 1;
	b->at_us = now_us;
}

void lg_bucket_refill(struct lg_bucket *b, int64_t now_us)
{
	double burst = b->rate * 0.02;

	if (burst < 1)
		burst = 1;
	b->tokens += (double)(now_us - b->at_us) * b->rate / 1e6;
	if (b->tokens > burst)
		b->tokens = burst;
	b->at_us = now_us;
}

int lg_bucket_take(struct lg_bucket *b)
{
	if (b->tokens < 1.0)
		return 0;
	b->tokens -= 1.0;
	return 1;
}

double lg_bucket_wait_us(const struct lg_bucket *b)
{
	return (1.0 - b->tokens) / b->rate * 1e6;
}

/* ------------------------------------------------------------------------ */
/* process                                                                    */

int lg_raise_nofile(const char *flag, unsigned n)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl))
		return 0;
	if (rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		if (setrlimit(RLIMIT_NOFILE, &rl))
			LOG(LOG_WARN, "cannot raise RLIMIT_NOFILE: %s", strerror(errno));
		getrlimit(RLIMIT_NOFILE, &rl);
	}
	if (rl.rlim_cur != RLIM_INFINITY && (uint64_t)n + 64 > (uint64_t)rl.rlim_cur) {
		fprintf(stderr, "%s: %s %u needs about %u open files, the limit is %llu\n",
			lg_prog, flag, n, n + 64, (unsigned long long)rl.rlim_cur);
		return -1;
	}
	return 0;
}

double lg_tv_s(struct timeval t)
{
	return (double)t.tv_sec + (double)t.tv_usec / 1e6;
}

static struct {
	struct lws_context *lws;
	int stopped;
	lws_usec_t interval_us;
	void (*print)(int64_t now_us);
	lws_sorted_usec_list_t sul;
} st;

static void stats_cb(lws_sorted_usec_list_t *sul)
{
	st.print(hub_mono_us());
	if (!st.stopped)
		lws_sul_schedule(st.lws, 0, &st.sul, stats_cb, st.interval_us);
}

void lg_stats_start(struct hc_ctx *x, double interval_s, void (*print)(int64_t now_us))
{
	st.lws = hc_lws(x);
	st.stopped = 0;
	st.interval_us = (lws_usec_t)(interval_s * 1e6);
	st.print = print;
	lws_sul_schedule(st.lws, 0, &st.sul, stats_cb, st.interval_us);
}

void lg_stats_stop(void)
{
	st.stopped = 1;
	if (st.lws)
		lws_sul_cancel(&st.sul);
}

/* ------------------------------------------------------------------------ */
/* MQTT                                                                       */

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

/* the whole packets at the start of b: the bytes they took, or (size_t)-1 */
static size_t mqtt_packets(const unsigned char *b, size_t n, size_t max,
			   void (*pkt)(void *, unsigned, const unsigned char *, size_t),
			   void *ctx)
{
	size_t off = 0;

	while (n - off >= 2) {
		const unsigned char *p = b + off;
		size_t avail = n - off, rl = 0, h = 1;
		unsigned shift = 0;
		int whole = 0;

		while (h < avail && h <= 4) {
			rl |= (size_t)(p[h] & 0x7f) << shift;
			shift += 7;
			if (!(p[h++] & 0x80)) {
				whole = 1;
				break;
			}
		}
		if (!whole && h > 4)
			return (size_t)-1;
		if (!whole)
			break;        /* the length goes on in the next message */
		if (rl > max)
			return (size_t)-1;
		if (avail - h < rl)
			break;        /* the body goes on in the next message */
		pkt(ctx, p[0], p + h, rl);
		off += h + rl;
	}
	return off;
}

int lg_mqtt_feed(hub_buf *rx, const unsigned char *in, size_t len, size_t max,
		 void (*pkt)(void *ctx, unsigned b0, const unsigned char *b, size_t n),
		 void *ctx)
{
	const unsigned char *b = in;
	size_t n = len, used;

	if (rx->len) {
		hub_buf_append(rx, in, len);
		b = (const unsigned char *)rx->data;
		n = rx->len;
	}
	used = mqtt_packets(b, n, max, pkt, ctx);
	if (used == (size_t)-1) {
		rx->len = 0;
		return -1;
	}
	if (b != in) {
		memmove(rx->data, rx->data + used, n - used);
		rx->len = n - used;
	} else if (used < n) {
		hub_buf_append(rx, in + used, n - used);
	}
	return 0;
}
