/*
 * sink.c - iot-sink: the hub's telemetry feed into PostgreSQL (docs/sink.md).
 *
 * One thread, one blocking loop: read every ingest shard's feed
 * (iot:feed:{i<k>}) as a member of a Redis consumer group, gather the
 * entries into a batch, and every batch-interval-ms (or batch-max-rows)
 * write the batch in one PostgreSQL transaction (sink/pgw.c), then XACK
 * its entries. A crash before the commit leaves the entries pending (read
 * again: this consumer's own at start, a dead member's through XAUTOCLAIM
 * after claim-idle-ms); a crash after the commit and before the XACK writes
 * them again, which the table's key turns into nothing. Between reads the
 * loop answers GET /metrics.
 */
#define _GNU_SOURCE /* accept4 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <sys/socket.h>

#include "hub/keys.h"
#include "sink/batch.h"
#include "sink/pgw.h"
#include "hub/rc.h"

#define SINK_VERSION   HUB_VERSION
#define ID_MAX         48
#define NAME_MAX_      128
#define HIST_N         8
#define BACKOFF_MAX_MS 5000
#define DRAIN_MS       15000

/* ---- options ---------------------------------------------------------------- */

enum opt_id {
	O_REDIS, O_PG, O_TABLE, O_GROUP, O_CONSUMER, O_INTERVAL, O_MAXROWS, O_READCOUNT,
	O_CLAIM, O_START, O_AHEAD, O_MODE, O_METRICS, O_TIMEOUT, O__COUNT
};

struct opt {
	const char *name, *env, *dflt, *help;
};

static const struct opt opts[O__COUNT] = {
	[O_REDIS] = { "redis", "IOT_SINK_REDIS", "redis://127.0.0.1:6379",
		      "the hub's Redis: redis://[:PASSWORD@]HOST:PORT[/DB], or comma-separated Redis Cluster seed URLs" },
	[O_PG] = { "pg", "IOT_SINK_PG", "",
		   "PostgreSQL conninfo (\"host=... dbname=... user=...\" or a postgresql:// URI; empty: libpq's PG* environment)" },
	[O_TABLE] = { "table", "IOT_SINK_TABLE", "iot_readings", "the readings table ([a-z_][a-z0-9_]{0,40}; created if missing)" },
	[O_GROUP] = { "group", "IOT_SINK_GROUP", "iot-sink", "the consumer group on every feed shard (one per destination database)" },
	[O_CONSUMER] = { "consumer", "IOT_SINK_CONSUMER", "", "this process's name in the group (default: the host name; unique per process, stable across restarts)" },
	[O_INTERVAL] = { "batch-interval-ms", "IOT_SINK_BATCH_INTERVAL_MS", "2000", "a batch is written this long after its first entry (100..60000)" },
	[O_MAXROWS] = { "batch-max-rows", "IOT_SINK_BATCH_MAX_ROWS", "20000", "... or once it holds this many readings (1..1000000)" },
	[O_READCOUNT] = { "read-count", "IOT_SINK_READ_COUNT", "500", "feed entries per XREADGROUP (1..100000)" },
	[O_CLAIM] = { "claim-idle-ms", "IOT_SINK_CLAIM_IDLE_MS", "30000", "entries pending this long with another member are taken over (XAUTOCLAIM; 500..86400000)" },
	[O_START] = { "start", "IOT_SINK_START", "first", "where a new group starts: first (every frame the feed still holds) or new (frames stored from now on)" },
	[O_AHEAD] = { "partitions-ahead", "IOT_SINK_PARTITIONS_AHEAD", "2", "daily partitions created ahead of today (0..60)" },
	[O_MODE] = { "write-mode", "IOT_SINK_WRITE_MODE", "copy", "copy (COPY into staging, then one INSERT ... SELECT) or insert (one INSERT per reading: for comparison)" },
	[O_METRICS] = { "metrics-listen", "IOT_SINK_METRICS_LISTEN", "127.0.0.1:9650", "HOST:PORT of GET /metrics (port 0: any free port; \"off\": none)" },
	[O_TIMEOUT] = { "redis-timeout-ms", "IOT_SINK_REDIS_TIMEOUT_MS", "5000", "connect and reply timeout of a Redis command (100..600000)" },
};

static const char *optval[O__COUNT];
static bool opt_unregister, opt_exit_idle;

static void usage(FILE *f)
{
	fprintf(f, "usage: iot-sink [--option value]... [--unregister] [--exit-when-idle]\n"
		"Writes the hub's telemetry feed into PostgreSQL (docs/sink.md).\n\n");
	for (int i = 0; i < O__COUNT; i++)
		fprintf(f, "  --%-20s %s\n  %-22s env %s, default \"%s\"\n", opts[i].name, opts[i].help,
			"", opts[i].env, opts[i].dflt);
	fprintf(f, "  --%-20s %s\n", "unregister",
		"destroy the group on every feed shard and exit (the hub then stops keeping frames for it)");
	fprintf(f, "  --%-20s %s\n", "exit-when-idle",
		"exit once every shard was read to its end and written (benchmarks)");
	fprintf(f, "  --%-20s %s\n", "version", "print the version");
}

/* ---- log ----------------------------------------------------------------------- */

static void sink_log(const char *level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sink_log(const char *level, const char *fmt, ...)
{
	char ts[32], msg[1024];
	struct timespec t;
	struct tm tm;
	va_list ap;

	clock_gettime(CLOCK_REALTIME, &t);
	gmtime_r(&t.tv_sec, &tm);
	strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	fprintf(stderr, "%s.%03ldZ iot-sink %s: %s\n", ts, t.tv_nsec / 1000000, level, msg);
}

static int64_t now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static double wall_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_REALTIME, &t);
	return (double)t.tv_sec + t.tv_nsec / 1e9;
}

/* ---- state --------------------------------------------------------------------- */

struct shard {
	char key[HUB_KEY_MAX];
	bool own_pending;          /* reading this consumer's pending entries (start) */
	char pending_from[ID_MAX];
	char claim_from[ID_MAX];
	long long lag;             /* unread + pending of the group; -1 unknown */
	bool drained;              /* the last read found nothing new */
};

static const double hist_bounds[HIST_N] = { 1, 10, 100, 1000, 5000, 10000, 50000, 200000 };

struct stats {
	uint64_t rows_written, rows_duplicate, frames, bad_entries, gap_frames, batches,
		 claimed, errors_redis, errors_pg;
	uint64_t batch_hist[HIST_N + 1];
	double batch_rows_sum, commit_s_sum, last_commit;
};

struct sink {
	struct rc *rc;
	struct pgw *pg;
	const char *group;
	char consumer[NAME_MAX_];
	unsigned nshards;
	struct shard shard[HUB_FEED_SHARDS_MAX];
	struct sink_batch batch;
	struct stats st;
	int interval_ms, max_rows, read_count, claim_ms;
	int metrics_fd;
	bool redis_up, pg_up;
	bool redis_seen;           /* redis_up has a value (logged on changes) */
	int64_t next_stats, next_claim, retry_at;
	int backoff_ms;
};

static volatile sig_atomic_t term;

static void on_term(int sig)
{
	(void)sig;
	term = 1;
}

/* ---- metrics ------------------------------------------------------------------- */

static void buf_printf(char **b, size_t *len, size_t *cap, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static void buf_printf(char **b, size_t *len, size_t *cap, const char *fmt, ...)
{
	va_list ap;
	int n;

	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(*b + *len, *cap - *len, fmt, ap);
		va_end(ap);
		if (n >= 0 && (size_t)n < *cap - *len)
			break;
		*cap = *cap * 2 + (size_t)n;
		if (!(*b = realloc(*b, *cap)))
			abort();
	}
	*len += (size_t)n;
}

static char *render(const struct sink *s, size_t *out_len)
{
	size_t cap = 8192, len = 0;
	char *b = malloc(cap);
	const struct stats *st = &s->st;
	uint64_t cum = 0;

	if (!b)
		abort();
	b[0] = '\0';
#define P(...) buf_printf(&b, &len, &cap, __VA_ARGS__)
	P("# HELP iot_sink_lag_frames Feed frames of the shard the group has not acknowledged "
	  "(unread + pending; -1: unknown).\n# TYPE iot_sink_lag_frames gauge\n");
	for (unsigned k = 0; k < s->nshards; k++)
		P("iot_sink_lag_frames{shard=\"%u\"} %lld\n", k, s->shard[k].lag);
	P("# HELP iot_sink_rows_written_total Readings inserted into PostgreSQL.\n"
	  "# TYPE iot_sink_rows_written_total counter\niot_sink_rows_written_total %llu\n",
	  (unsigned long long)st->rows_written);
	P("# HELP iot_sink_rows_duplicate_total Readings written again and found in the table "
	  "(entries read again after a crash or a takeover).\n"
	  "# TYPE iot_sink_rows_duplicate_total counter\niot_sink_rows_duplicate_total %llu\n",
	  (unsigned long long)st->rows_duplicate);
	P("# HELP iot_sink_frames_total Feed entries committed and acknowledged.\n"
	  "# TYPE iot_sink_frames_total counter\niot_sink_frames_total %llu\n",
	  (unsigned long long)st->frames);
	P("# HELP iot_sink_bad_entries_total Feed entries that did not parse (skipped).\n"
	  "# TYPE iot_sink_bad_entries_total counter\niot_sink_bad_entries_total %llu\n",
	  (unsigned long long)st->bad_entries);
	P("# HELP iot_sink_gap_frames_total Feed frames trimmed before this group read them.\n"
	  "# TYPE iot_sink_gap_frames_total counter\niot_sink_gap_frames_total %llu\n",
	  (unsigned long long)st->gap_frames);
	P("# HELP iot_sink_claimed_total Entries taken over from other members (XAUTOCLAIM).\n"
	  "# TYPE iot_sink_claimed_total counter\niot_sink_claimed_total %llu\n",
	  (unsigned long long)st->claimed);
	P("# HELP iot_sink_errors_total Failed operations, by side.\n"
	  "# TYPE iot_sink_errors_total counter\niot_sink_errors_total{kind=\"redis\"} %llu\n"
	  "iot_sink_errors_total{kind=\"postgres\"} %llu\n",
	  (unsigned long long)st->errors_redis, (unsigned long long)st->errors_pg);
	P("# HELP iot_sink_batch_rows Readings per committed batch.\n"
	  "# TYPE iot_sink_batch_rows histogram\n");
	for (int i = 0; i < HIST_N; i++) {
		cum += st->batch_hist[i];
		P("iot_sink_batch_rows_bucket{le=\"%g\"} %llu\n", hist_bounds[i], (unsigned long long)cum);
	}
	cum += st->batch_hist[HIST_N];
	P("iot_sink_batch_rows_bucket{le=\"+Inf\"} %llu\niot_sink_batch_rows_sum %.0f\n"
	  "iot_sink_batch_rows_count %llu\n", (unsigned long long)cum, st->batch_rows_sum,
	  (unsigned long long)st->batches);
	P("# HELP iot_sink_commit_seconds Time to write and commit a batch.\n"
	  "# TYPE iot_sink_commit_seconds summary\niot_sink_commit_seconds_sum %.6f\n"
	  "iot_sink_commit_seconds_count %llu\n", st->commit_s_sum, (unsigned long long)st->batches);
	P("# HELP iot_sink_last_commit_timestamp_seconds When the last batch was committed (0: none).\n"
	  "# TYPE iot_sink_last_commit_timestamp_seconds gauge\n"
	  "iot_sink_last_commit_timestamp_seconds %.3f\n", st->last_commit);
	P("# HELP iot_sink_up Whether the sink's connections work.\n# TYPE iot_sink_up gauge\n"
	  "iot_sink_up{target=\"redis\"} %d\niot_sink_up{target=\"postgres\"} %d\n",
	  s->redis_up, s->pg_up);
	P("# HELP iot_sink_pending_rows Readings read and not yet committed.\n"
	  "# TYPE iot_sink_pending_rows gauge\niot_sink_pending_rows %zu\n", s->batch.nrows);
#undef P
	*out_len = len;
	return b;
}

static int metrics_open(const char *spec, char *err, size_t errlen)
{
	char host[64];
	const char *colon = strrchr(spec, ':');
	struct sockaddr_in a = { .sin_family = AF_INET };
	socklen_t al = sizeof(a);
	int fd, one = 1;

	if (!strcmp(spec, "off"))
		return -2;
	if (!colon || (size_t)(colon - spec) >= sizeof(host)) {
		snprintf(err, errlen, "metrics-listen: expected HOST:PORT, not \"%s\"", spec);
		return -1;
	}
	memcpy(host, spec, (size_t)(colon - spec));
	host[colon - spec] = '\0';
	if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
		snprintf(err, errlen, "metrics-listen: %s is not an IPv4 address", host);
		return -1;
	}
	a.sin_port = htons((uint16_t)atoi(colon + 1));
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) || listen(fd, 16)) {
		snprintf(err, errlen, "metrics-listen %s: %s", spec, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	getsockname(fd, (struct sockaddr *)&a, &al);
	sink_log("info", "metrics listening on %s:%u", host, ntohs(a.sin_port));
	return fd;
}

/* Answers the connections waiting on the metrics socket (each request read
 * with a short deadline: a slow client delays the loop by at most that). */
static void metrics_serve(struct sink *s)
{
	for (;;) {
		int c = accept4(s->metrics_fd, NULL, NULL, SOCK_CLOEXEC);
		struct timeval tv = { 0, 300 * 1000 };
		char req[2048];
		size_t got = 0;

		if (c < 0)
			return;
		setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
		setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
		while (got < sizeof(req) - 1) {
			ssize_t n = recv(c, req + got, sizeof(req) - 1 - got, 0);
			if (n <= 0)
				break;
			got += (size_t)n;
			req[got] = '\0';
			if (strstr(req, "\r\n\r\n"))
				break;
		}
		req[got] = '\0';
		char head[160];
		const char *body = "not found\n";
		char *m = NULL;
		size_t blen;
		int code = 404;

		if (!strncmp(req, "GET /metrics ", 13) || !strncmp(req, "GET /metrics?", 13)) {
			m = render(s, &blen);
			body = m;
			code = 200;
		} else if (!strncmp(req, "GET /healthz ", 13)) {
			body = "ok\n";
			code = 200;
		}
		if (!m)
			blen = strlen(body);
		int hl = snprintf(head, sizeof(head), "HTTP/1.1 %d %s\r\nContent-Type: %s\r\n"
				  "Content-Length: %zu\r\nConnection: close\r\n\r\n", code,
				  code == 200 ? "OK" : "Not Found",
				  m ? "text/plain; version=0.0.4" : "text/plain", blen);
		if (send(c, head, (size_t)hl, MSG_NOSIGNAL) == hl) {
			size_t off = 0;
			while (off < blen) {
				ssize_t n = send(c, body + off, blen - off, MSG_NOSIGNAL);
				if (n <= 0)
					break;
				off += (size_t)n;
			}
		}
		free(m);
		close(c);
	}
}

/* Waits up to ms for a metrics request (or a signal), then answers it. */
static void idle(struct sink *s, int ms)
{
	struct pollfd p = { .fd = s->metrics_fd, .events = POLLIN };

	if (ms <= 0)
		ms = 1;
	if (s->metrics_fd >= 0) {
		if (poll(&p, 1, ms) > 0)
			metrics_serve(s);
	} else {
		poll(NULL, 0, ms);
	}
}

/* ---- Redis side ------------------------------------------------------------------ */

static redisReply *cmd(struct sink *s, const char *key, int argc, const char **argv)
{
	redisReply *r = rc_cmd(s->rc, key, argc, argv, NULL);

	if (!r) {
		s->st.errors_redis++;
		if (s->redis_up || !s->redis_seen)
			sink_log("error", "redis: %s", rc_error(s->rc));
		s->redis_up = false;
		s->redis_seen = true;
		return NULL;
	}
	if (!s->redis_up)
		sink_log("info", "redis: connected%s", rc_is_cluster(s->rc) ? " (cluster)" : "");
	s->redis_up = true;
	s->redis_seen = true;
	return r;
}

/* The group's creation: at the start (with ENTRIESREAD = the frames trimmed
 * already, so that those do not count as this group's gap) or at the end. */
static const char create_lua[] =
	"local n, added = 0, 0\n"
	"if redis.call('EXISTS', KEYS[1]) == 1 then\n"
	"  local info = redis.call('XINFO', 'STREAM', KEYS[1])\n"
	"  for i = 1, #info, 2 do\n"
	"    if info[i] == 'length' then n = info[i + 1] end\n"
	"    if info[i] == 'entries-added' then added = info[i + 1] end\n"
	"  end\n"
	"end\n"
	"local ok, err\n"
	"if ARGV[2] == 'new' then\n"
	"  ok, err = pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], '$', 'MKSTREAM')\n"
	"else\n"
	"  ok, err = pcall(redis.call, 'XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM',\n"
	"                  'ENTRIESREAD', added - n)\n"
	"end\n"
	"if ok then return 1 end\n"
	"if string.find(tostring(err.err or err), 'BUSYGROUP') then return 0 end\n"
	"return redis.error_reply(tostring(err.err or err))\n";

/* The group's progress, and a gap: frames trimmed that the group never read
 * (entries-added - length > entries-read). A gap is reported once: the
 * group's counter is set past it (XGROUP SETID to its own position with
 * ENTRIESREAD = the frames trimmed). Reply {lag + pending or -1, gap}. */
static const char stats_lua[] =
	"local function f(flat, name)\n"
	"  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end\n"
	"end\n"
	"if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0} end\n"
	"local g\n"
	"for _, x in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do\n"
	"  if f(x, 'name') == ARGV[1] then g = x end\n"
	"end\n"
	"if not g then return {-2, 0} end\n"
	"local info = redis.call('XINFO', 'STREAM', KEYS[1])\n"
	"local trimmed = f(info, 'entries-added') - f(info, 'length')\n"
	"local read, lag, pending = f(g, 'entries-read'), f(g, 'lag'), f(g, 'pending')\n"
	"local gap = 0\n"
	"if read and trimmed > read then\n"
	"  gap = trimmed - read\n"
	"  redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], f(g, 'last-delivered-id'),\n"
	"             'ENTRIESREAD', trimmed)\n"
	"  lag = f(info, 'length')\n"
	"end\n"
	"if not lag then return {-1, gap} end\n"
	"return {lag + pending, gap}\n";

static int learn_shards(struct sink *s)
{
	const char *av[] = { "HGET", HUB_KEY_INGEST, "shards" };
	redisReply *r = cmd(s, HUB_KEY_INGEST, 3, av);
	long n = 0;

	if (!r)
		return -1;
	if (r->type == REDIS_REPLY_STRING)
		n = strtol(r->str, NULL, 10);
	freeReplyObject(r);
	if (n < 1 || n > HUB_FEED_SHARDS_MAX)
		return 0;
	return (int)n;
}

static int register_group(struct sink *s, const char *start)
{
	for (unsigned k = 0; k < s->nshards; k++) {
		const char *av[] = { "EVAL", create_lua, "1", s->shard[k].key, s->group, start };
		redisReply *r = cmd(s, s->shard[k].key, 6, av);
		if (!r)
			return -1;
		if (r->type == REDIS_REPLY_ERROR) {
			sink_log("error", "creating group %s on %s: %s", s->group, s->shard[k].key, r->str);
			freeReplyObject(r);
			return -1;
		}
		if (r->integer == 1)
			sink_log("info", "group %s created on %s (start: %s)", s->group, s->shard[k].key,
				 start);
		freeReplyObject(r);
	}
	return 0;
}

/* One entry [id, [field, value, ...]] (fields nil: trimmed while pending). */
static void take_entry(struct sink *s, unsigned k, const redisReply *e)
{
	const redisReply *id, *f, *gw = NULL, *seq = NULL, *rd = NULL;

	if (e->type != REDIS_REPLY_ARRAY || e->elements < 2 ||
	    (id = e->element[0])->type != REDIS_REPLY_STRING)
		return;
	f = e->element[1];
	if (f->type != REDIS_REPLY_ARRAY) {
		/* gone from the feed while pending: ack it, count it missing */
		s->st.gap_frames++;
		sink_batch_add(&s->batch, k, id->str, NULL, 0, NULL, 0, NULL, 0, now_ms());
		s->batch.bad_entries--;
		return;
	}
	for (size_t i = 0; i + 1 < f->elements; i += 2) {
		const char *n = f->element[i]->str;
		if (!strcmp(n, "gw"))
			gw = f->element[i + 1];
		else if (!strcmp(n, "seq"))
			seq = f->element[i + 1];
		else if (!strcmp(n, "readings"))
			rd = f->element[i + 1];
	}
	if (!gw || !seq || !rd) {
		sink_batch_add(&s->batch, k, id->str, NULL, 0, NULL, 0, NULL, 0, now_ms());
		return;
	}
	sink_batch_add(&s->batch, k, id->str, gw->str, gw->len, seq->str, seq->len, rd->str,
		       rd->len, now_ms());
}

/* Reads one shard once. Returns the entries read, or -1 (Redis failed). */
static int read_shard(struct sink *s, unsigned k)
{
	struct shard *sh = &s->shard[k];
	char count[16];
	const char *id = sh->own_pending ? sh->pending_from : ">";
	int n = 0;

	snprintf(count, sizeof(count), "%d", s->read_count);
	const char *av[] = { "XREADGROUP", "GROUP", s->group, s->consumer, "COUNT", count,
			     "STREAMS", sh->key, id };
	redisReply *r = cmd(s, sh->key, 9, av);
	if (!r)
		return -1;
	if (r->type == REDIS_REPLY_ERROR) {
		s->st.errors_redis++;
		sink_log("error", "XREADGROUP %s: %s", sh->key, r->str);
		if (strstr(r->str, "NOGROUP"))
			register_group(s, "first"); /* the group was destroyed: register again */
		freeReplyObject(r);
		return -1;
	}
	if (r->type == REDIS_REPLY_ARRAY && r->elements == 1 &&
	    r->element[0]->type == REDIS_REPLY_ARRAY && r->element[0]->elements == 2) {
		const redisReply *list = r->element[0]->element[1];
		for (size_t i = 0; list->type == REDIS_REPLY_ARRAY && i < list->elements; i++) {
			take_entry(s, k, list->element[i]);
			if (sh->own_pending && list->element[i]->type == REDIS_REPLY_ARRAY)
				snprintf(sh->pending_from, ID_MAX, "%s", list->element[i]->element[0]->str);
			n++;
		}
	}
	freeReplyObject(r);
	if (sh->own_pending && !n) {
		sh->own_pending = false; /* this consumer's pending entries are all read again */
		return 0;
	}
	sh->drained = !n;
	return n;
}

/* One command to every shard in turn: send issues it for a shard, take reads
 * each reply that is not an error. An error reply is counted and logged as
 * "<what> <key>: <error>"; Redis down ends the round (the next one retries). */
static void shard_round(struct sink *s, const char *what,
			redisReply *(*send)(struct sink *s, struct shard *sh),
			void (*take)(struct sink *s, unsigned k, const redisReply *r))
{
	for (unsigned k = 0; k < s->nshards; k++) {
		struct shard *sh = &s->shard[k];
		redisReply *r = send(s, sh);

		if (!r)
			return;
		if (r->type == REDIS_REPLY_ERROR) {
			s->st.errors_redis++;
			sink_log("error", "%s %s: %s", what, sh->key, r->str);
		} else {
			take(s, k, r);
		}
		freeReplyObject(r);
	}
}

static redisReply *claim_send(struct sink *s, struct shard *sh)
{
	char idle[16], count[16];

	snprintf(idle, sizeof(idle), "%d", s->claim_ms);
	snprintf(count, sizeof(count), "%d", s->read_count);
	const char *av[] = { "XAUTOCLAIM", sh->key, s->group, s->consumer, idle,
			     sh->claim_from, "COUNT", count };
	return cmd(s, sh->key, 8, av);
}

static void claim_take(struct sink *s, unsigned k, const redisReply *r)
{
	struct shard *sh = &s->shard[k];
	const redisReply *list;

	if (r->type != REDIS_REPLY_ARRAY || r->elements < 2 ||
	    r->element[0]->type != REDIS_REPLY_STRING)
		return;
	list = r->element[1];
	snprintf(sh->claim_from, ID_MAX, "%s", r->element[0]->str);
	for (size_t i = 0; list->type == REDIS_REPLY_ARRAY && i < list->elements; i++) {
		take_entry(s, k, list->element[i]);
		s->st.claimed++;
	}
	if (r->elements >= 3 && r->element[2]->type == REDIS_REPLY_ARRAY &&
	    r->element[2]->elements) {
		/* pending entries trimmed from the feed: dropped by Redis */
		s->st.gap_frames += r->element[2]->elements;
		sink_log("warn", "%s: %zu pending frames were trimmed from the feed before "
			 "they were written (a gap)", sh->key, r->element[2]->elements);
	}
	if (list->type == REDIS_REPLY_ARRAY && list->elements)
		sink_log("info", "%s: took over %zu entries pending with another member",
			 sh->key, list->elements);
}

/* Takes over entries pending too long with other (dead) members. */
static void claim_round(struct sink *s)
{
	shard_round(s, "XAUTOCLAIM", claim_send, claim_take);
}

static redisReply *stats_send(struct sink *s, struct shard *sh)
{
	const char *av[] = { "EVAL", stats_lua, "1", sh->key, s->group };

	return cmd(s, sh->key, 5, av);
}

static void stats_take(struct sink *s, unsigned k, const redisReply *r)
{
	struct shard *sh = &s->shard[k];

	if (r->type != REDIS_REPLY_ARRAY || r->elements != 2)
		return;
	sh->lag = r->element[0]->integer;
	if (sh->lag == -2) {
		sink_log("warn", "%s: group %s is gone: registering it again", sh->key, s->group);
		register_group(s, "first");
		sh->lag = -1;
	}
	if (r->element[1]->integer > 0) {
		s->st.gap_frames += (uint64_t)r->element[1]->integer;
		sink_log("warn", "%s: %lld frames were trimmed from the feed before group %s "
			 "read them (a gap: the hub's feed-sink-max-lag was exceeded)",
			 sh->key, r->element[1]->integer, s->group);
	}
}

/* Each shard's lag and gap (stats_lua); registers a group that is gone again. */
static void stats_round(struct sink *s)
{
	shard_round(s, "stats of", stats_send, stats_take);
}

static void ack(struct sink *s)
{
	for (unsigned k = 0; k < s->nshards; k++) {
		struct sink_ids *a = &s->batch.acks[k];
		for (size_t at = 0; at < a->n;) {
			size_t n = a->n - at < 1000 ? a->n - at : 1000;
			const char **av = malloc((3 + n) * sizeof(*av));
			if (!av)
				abort();
			av[0] = "XACK";
			av[1] = s->shard[k].key;
			av[2] = s->group;
			for (size_t i = 0; i < n; i++)
				av[3 + i] = a->ids[at + i];
			redisReply *r = cmd(s, s->shard[k].key, (int)(3 + n), av);
			free(av);
			if (!r) {
				/* still pending: read again (XAUTOCLAIM) and deduplicated */
				sink_log("warn", "XACK %s failed: %zu entries stay pending", s->shard[k].key,
					 a->n - at);
				break;
			}
			freeReplyObject(r);
			at += n;
		}
	}
}

/* ---- batches --------------------------------------------------------------------- */

static int flush(struct sink *s)
{
	long long inserted = 0;
	double t0 = wall_s();
	const char *hook = getenv("IOT_SINK_TEST_CRASH");

	if (!s->pg_up || !pgw_connected(s->pg)) {
		if (pgw_connect(s->pg)) {
			s->st.errors_pg++;
			if (s->pg_up || !s->retry_at)
				sink_log("error", "postgres: %s", pgw_error(s->pg));
			s->pg_up = false;
			return -1;
		}
		sink_log("info", "postgres: connected (table %s)", pgw_kind(s->pg));
		s->pg_up = true;
	}
	if (s->batch.nrows && pgw_write(s->pg, &s->batch, &inserted)) {
		s->st.errors_pg++;
		s->pg_up = pgw_connected(s->pg);
		sink_log("error", "postgres: writing %zu readings: %s", s->batch.nrows, pgw_error(s->pg));
		return -1;
	}
	if (hook && !strcmp(hook, "after-commit") && s->batch.nrows)
		raise(SIGKILL); /* tests only: committed, not acknowledged */
	ack(s);
	s->st.rows_written += (uint64_t)inserted;
	s->st.rows_duplicate += s->batch.nrows - (uint64_t)inserted;
	s->st.frames += s->batch.nentries;
	s->st.bad_entries += s->batch.bad_entries;
	s->st.batches++;
	s->st.batch_rows_sum += (double)s->batch.nrows;
	int i = 0;
	while (i < HIST_N && (double)s->batch.nrows > hist_bounds[i])
		i++;
	s->st.batch_hist[i]++;
	s->st.last_commit = wall_s();
	s->st.commit_s_sum += s->st.last_commit - t0;
	if (s->batch.bad_entries)
		sink_log("warn", "%llu feed entries did not parse and were skipped",
			 (unsigned long long)s->batch.bad_entries);
	sink_batch_reset(&s->batch);
	s->batch.bad_entries = 0;
	return 0;
}

static bool batch_due(const struct sink *s, int64_t now)
{
	if (!s->batch.nentries)
		return false;
	return term || s->batch.nrows >= (size_t)s->max_rows ||
	       now - s->batch.started_ms >= s->interval_ms;
}

static void backoff(struct sink *s, int64_t now)
{
	s->backoff_ms = s->backoff_ms ? s->backoff_ms * 2 : 100;
	if (s->backoff_ms > BACKOFF_MAX_MS)
		s->backoff_ms = BACKOFF_MAX_MS;
	s->retry_at = now + s->backoff_ms;
}

/* ---- setup ------------------------------------------------------------------------- */

static long num_opt(int id, long lo, long hi, char *err, size_t errlen)
{
	char *end;
	long v = strtol(optval[id], &end, 10);

	if (*end || end == optval[id] || v < lo || v > hi) {
		snprintf(err, errlen, "%s: expected an integer in %ld..%ld, not \"%s\"", opts[id].name,
			 lo, hi, optval[id]);
		return LONG_MIN;
	}
	return v;
}

static bool name_ok(const char *s, size_t max, bool sql)
{
	size_t n = strlen(s);

	if (!n || n > max)
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		bool ok = (c >= 'a' && c <= 'z') || c == '_' || (i && c >= '0' && c <= '9');
		if (!sql)
			ok = ok || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
			     c == '-' || c == ':';
		if (!ok)
			return false;
	}
	return true;
}

static int parse_args(int argc, char **argv, char *err, size_t errlen)
{
	struct option lo[O__COUNT + 4];
	int c;

	for (int i = 0; i < O__COUNT; i++) {
		lo[i] = (struct option){ opts[i].name, required_argument, NULL, i };
		optval[i] = getenv(opts[i].env) ? getenv(opts[i].env) : opts[i].dflt;
	}
	lo[O__COUNT] = (struct option){ "unregister", no_argument, NULL, 'u' };
	lo[O__COUNT + 1] = (struct option){ "exit-when-idle", no_argument, NULL, 'x' };
	lo[O__COUNT + 2] = (struct option){ "help", no_argument, NULL, 'h' };
	lo[O__COUNT + 3] = (struct option){ "version", no_argument, NULL, 'V' };
	struct option all[O__COUNT + 5];
	memcpy(all, lo, sizeof(lo));
	all[O__COUNT + 4] = (struct option){ 0 };
	while ((c = getopt_long(argc, argv, "h", all, NULL)) != -1) {
		if (c >= 0 && c < O__COUNT)
			optval[c] = optarg;
		else if (c == 'u')
			opt_unregister = true;
		else if (c == 'x')
			opt_exit_idle = true;
		else if (c == 'h') {
			usage(stdout);
			exit(0);
		} else if (c == 'V') {
			printf("iot-sink %s\n", SINK_VERSION);
			exit(0);
		} else {
			snprintf(err, errlen, "unknown option (iot-sink --help lists them)");
			return -1;
		}
	}
	if (optind < argc) {
		snprintf(err, errlen, "unexpected argument \"%s\"", argv[optind]);
		return -1;
	}
	return 0;
}

static int configure(struct sink *s, char *err, size_t errlen)
{
	long v;

	if (!name_ok(optval[O_TABLE], 40, true)) {
		snprintf(err, errlen, "table: expected [a-z_][a-z0-9_]{0,40}, not \"%s\"", optval[O_TABLE]);
		return -1;
	}
	if (!name_ok(optval[O_GROUP], NAME_MAX_ - 1, false)) {
		snprintf(err, errlen, "group: expected [A-Za-z0-9._:-]{1,127}, not \"%s\"", optval[O_GROUP]);
		return -1;
	}
	s->group = optval[O_GROUP];
	if (optval[O_CONSUMER][0]) {
		snprintf(s->consumer, sizeof(s->consumer), "%s", optval[O_CONSUMER]);
	} else if (gethostname(s->consumer, sizeof(s->consumer) - 1)) {
		snprintf(s->consumer, sizeof(s->consumer), "iot-sink");
	}
	if (!name_ok(s->consumer, NAME_MAX_ - 1, false)) {
		snprintf(err, errlen, "consumer: expected [A-Za-z0-9._:-]{1,127}, not \"%s\"", s->consumer);
		return -1;
	}
	if (strcmp(optval[O_START], "first") && strcmp(optval[O_START], "new")) {
		snprintf(err, errlen, "start: expected first or new, not \"%s\"", optval[O_START]);
		return -1;
	}
	if (strcmp(optval[O_MODE], "copy") && strcmp(optval[O_MODE], "insert")) {
		snprintf(err, errlen, "write-mode: expected copy or insert, not \"%s\"", optval[O_MODE]);
		return -1;
	}
	if ((v = num_opt(O_INTERVAL, 100, 60000, err, errlen)) == LONG_MIN)
		return -1;
	s->interval_ms = (int)v;
	if ((v = num_opt(O_MAXROWS, 1, 1000000, err, errlen)) == LONG_MIN)
		return -1;
	s->max_rows = (int)v;
	if ((v = num_opt(O_READCOUNT, 1, 100000, err, errlen)) == LONG_MIN)
		return -1;
	s->read_count = (int)v;
	if ((v = num_opt(O_CLAIM, 500, 86400000, err, errlen)) == LONG_MIN)
		return -1;
	s->claim_ms = (int)v;
	long ahead = num_opt(O_AHEAD, 0, 60, err, errlen);
	if (ahead == LONG_MIN)
		return -1;
	long tmo = num_opt(O_TIMEOUT, 100, 600000, err, errlen);
	if (tmo == LONG_MIN)
		return -1;
	if (!(s->rc = rc_new(optval[O_REDIS], (int)tmo, err, errlen)))
		return -1;
	s->pg = pgw_new(optval[O_PG], optval[O_TABLE], (int)ahead, !strcmp(optval[O_MODE], "insert"));
	s->metrics_fd = metrics_open(optval[O_METRICS], err, errlen);
	if (s->metrics_fd == -1)
		return -1;
	return 0;
}

/* Waits (serving metrics) until fn succeeds or SIGTERM; 0 or -1. */
static int until_ok(struct sink *s, int (*fn)(struct sink *), const char *what)
{
	int backoff_ms = 100;
	bool said = false;

	while (!term) {
		int rc = fn(s);
		if (rc > 0 || rc == 0)
			return rc;
		if (!said)
			sink_log("warn", "%s: retrying", what);
		said = true;
		idle(s, backoff_ms);
		backoff_ms = backoff_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff_ms * 2;
	}
	return -1;
}

static int step_shards(struct sink *s)
{
	static bool said;
	int n = learn_shards(s);

	if (n < 0)
		return -1;
	if (n == 0) {
		if (!said)
			sink_log("warn", "waiting for a hub to record the ingest shards (" HUB_KEY_INGEST
				 " shards)");
		said = true;
		return -1;
	}
	s->nshards = (unsigned)n;
	for (unsigned k = 0; k < s->nshards; k++) {
		hub_key_feed(s->shard[k].key, sizeof(s->shard[k].key), k);
		s->shard[k].own_pending = true;
		snprintf(s->shard[k].pending_from, ID_MAX, "0");
		snprintf(s->shard[k].claim_from, ID_MAX, "0-0");
		s->shard[k].lag = -1;
	}
	return 0;
}

static int step_register(struct sink *s)
{
	return register_group(s, optval[O_START]) ? -1 : 0;
}

static int step_pg(struct sink *s)
{
	if (pgw_connect(s->pg)) {
		s->st.errors_pg++;
		sink_log("error", "postgres: %s", pgw_error(s->pg));
		return -1;
	}
	s->pg_up = true;
	sink_log("info", "postgres: connected (table %s, %s)", optval[O_TABLE], pgw_kind(s->pg));
	return 0;
}

static int unregister(struct sink *s)
{
	int rc = 0;

	for (unsigned k = 0; k < s->nshards; k++) {
		const char *av[] = { "XGROUP", "DESTROY", s->shard[k].key, s->group };
		redisReply *r = cmd(s, s->shard[k].key, 4, av);
		if (!r || r->type == REDIS_REPLY_ERROR) {
			sink_log("error", "XGROUP DESTROY %s: %s", s->shard[k].key,
				 r ? r->str : rc_error(s->rc));
			rc = 1;
		}
		if (r)
			freeReplyObject(r);
	}
	if (!rc)
		sink_log("info", "group %s destroyed on %u feed shards", s->group, s->nshards);
	return rc;
}

/* ---- the loop ------------------------------------------------------------------------ */

static void run(struct sink *s)
{
	int64_t drain_until = 0;
	bool idle_seen = false;

	s->next_claim = now_ms() + s->claim_ms / 2;
	for (;;) {
		int64_t now = now_ms();
		int got = 0;
		bool failed = false;

		if (term && !drain_until) {
			drain_until = now + DRAIN_MS;
			sink_log("info", "SIGTERM: writing the current batch (%zu readings), then exiting",
				 s->batch.nrows);
		}
		if (term && (!s->batch.nentries || now >= drain_until))
			break;
		if (s->metrics_fd >= 0)
			metrics_serve(s);
		if (now >= s->next_stats) {
			stats_round(s);
			s->next_stats = now + 1000;
		}
		if (s->retry_at && now < s->retry_at) {
			idle(s, (int)(s->retry_at - now));
			continue;
		}
		if (!term && s->batch.nrows < (size_t)s->max_rows) {
			if (!s->batch.nentries && now >= s->next_claim) {
				claim_round(s);
				s->next_claim = now + s->claim_ms / 2;
			}
			for (unsigned k = 0; k < s->nshards; k++) {
				int n = read_shard(s, k);
				if (n < 0) {
					failed = true;
					break;
				}
				got += n;
			}
		}
		now = now_ms();
		if (batch_due(s, now)) {
			if (flush(s)) {
				backoff(s, now);
				continue;
			}
			s->backoff_ms = 0;
			s->retry_at = 0;
			continue;
		}
		if (failed) {
			backoff(s, now);
			continue;
		}
		s->retry_at = 0;
		if (!got) {
			bool own = false;
			for (unsigned k = 0; k < s->nshards; k++)
				own |= s->shard[k].own_pending;
			if (opt_exit_idle && !s->batch.nentries && !own) {
				if (idle_seen)
					break;
				idle_seen = true; /* once more, after a fresh look */
				continue;
			}
			idle_seen = false;
			int wait = 100;
			if (s->batch.nentries) {
				int64_t left = s->batch.started_ms + s->interval_ms - now;
				if (left < wait)
					wait = (int)left;
			}
			idle(s, wait);
		}
	}
}

int main(int argc, char **argv)
{
	static struct sink S;
	struct sink *s = &S;
	struct sigaction sa = { .sa_handler = on_term };
	char err[512] = "";
	int rc = 0;

	s->metrics_fd = -1;
	if (parse_args(argc, argv, err, sizeof(err)) || configure(s, err, sizeof(err))) {
		fprintf(stderr, "iot-sink: %s\n", err);
		rc = 2;
		goto out;
	}
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	if (until_ok(s, step_shards, "redis: reading the ingest shards")) {
		rc = term ? 0 : 1;
		goto out;
	}
	if (opt_unregister) {
		rc = unregister(s);
		goto out;
	}
	if (until_ok(s, step_register, "redis: registering the group") ||
	    until_ok(s, step_pg, "postgres: connecting")) {
		rc = term ? 0 : 1;
		goto out;
	}
	sink_log("info", "reading %u feed shard%s as group %s, consumer %s (%s, batches every %d ms "
		 "or %d readings)", s->nshards, s->nshards == 1 ? "" : "s", s->group, s->consumer,
		 rc_is_cluster(s->rc) ? "Redis Cluster" : "one Redis", s->interval_ms, s->max_rows);
	run(s);
	if (s->batch.nentries) {
		sink_log("error", "exiting with %zu readings not written (they stay pending in the "
			 "group and are read again)", s->batch.nrows);
		rc = 1;
	} else {
		sink_log("info", "exiting: %llu readings written, %llu duplicates skipped, %llu frames",
			 (unsigned long long)s->st.rows_written, (unsigned long long)s->st.rows_duplicate,
			 (unsigned long long)s->st.frames);
	}
out:
	sink_batch_free(&s->batch);
	pgw_free(s->pg);
	rc_free(s->rc);
	if (s->metrics_fd >= 0)
		close(s->metrics_fd);
	return rc;
}
