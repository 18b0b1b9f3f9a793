/*
 * sdk_gw.c - a test gateway on libiothub-gw, driven by tests (sdk/c/tests/
 * test_sdk_c.py). It streams readings numbered i = start..count-1, reading i
 * going to device devs[i % n] with ts = ts_base + i, from a second thread
 * (send is thread-safe), and appends "i\n" to the accepted log once send()
 * accepted it; then it waits until everything is acked and prints its
 * counters. Rejects go to stdout as "reject <code> <reading>", commands are
 * run by handlers that log "run <id> <name> <attempt>" to the command log.
 *
 *   sdk_gw --url U --token T --spool DIR --devices a,b [--type thermostat]
 *          [--count N --start I --ts-base MS --rate R --bad-every K]
 *          [--fsync none|batch|always --max-spool BYTES --segment BYTES]
 *          [--accepted FILE] [--commands FILE --serve-ms MS] [--ack-timeout MS]
 *          [--ca FILE --cert FILE --key FILE]   (wss://, mTLS)
 *          [--token-file FILE] (the token, read again before every connect)
 *          [--until-full]      (stop at the first "spool full", exit 3)
 *          [--bench]           (no logs: print readings/s into the spool)
 *          [--poll]            (the main loop is poll() on iothub_gw_fd(), as
 *                               a foreign event loop; stats count its turns)
 * Exit: 0 done, 1 usage or setup, 2 not drained in time, 3 spool full.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "iothub/gateway.h"

static struct {
	const char *url, *token, *spool, *type, *accepted, *commands;
	const char *ca, *cert, *key, *token_file, *sign_seed;
	char *devs[256];
	int ndevs;
	long long count, start, ts_base, bad_every, serve_ms, rate, ack_timeout;
	size_t max_spool, segment;
	enum iothub_gw_fsync fsync;
	int until_full, bench, poll;
} a = { .type = "thermostat", .count = 1000, .fsync = IOTHUB_GW_FSYNC_NONE };

static struct iothub_gw *gw;
static EVP_PKEY *sign_key;

/* The signing hook (docs/sdk.md): every device signs with --sign-seed. */
static int sign_cb(struct iothub_gw *g, const char *device, const unsigned char *msg, size_t len,
		   unsigned char sig[64], void *user)
{
	EVP_MD_CTX *m = EVP_MD_CTX_new();
	size_t sl = 64;
	int ok;

	(void)g;
	(void)device;
	(void)user;
	ok = m && EVP_DigestSignInit(m, NULL, NULL, NULL, sign_key) == 1 &&
	     EVP_DigestSign(m, sig, &sl, msg, len) == 1 && sl == 64;
	EVP_MD_CTX_free(m);
	return ok ? 0 : -1;
}
static int acc_fd = -1, cmd_fd = -1;
static atomic_int sender_done, full_hit;
static volatile sig_atomic_t got_term;

static int64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void logline(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logline(int fd, const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	int n;

	if (fd < 0)
		return;
	va_start(ap, fmt);
	n = vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	if (write(fd, buf, (size_t)n) != n)
		abort();
}

static void *sender(void *arg)
{
	char data[96], err[256];
	int64_t t0 = mono_ms();

	(void)arg;
	for (long long i = a.start; i < a.count; i++) {
		const char *dev = a.devs[i % a.ndevs];
		int rc;

		if (a.bad_every && i % a.bad_every == a.bad_every - 1)
			snprintf(data, sizeof(data), "{\"temperature\":%d}", 500);   /* invalid */
		else
			snprintf(data, sizeof(data), "{\"temperature\":%lld.5}", i % 100);
		for (;;) {
			rc = iothub_gw_send(gw, dev, a.ts_base + i, data, err, sizeof(err));
			if (rc != IOTHUB_GW_ESPOOL_FULL)
				break;
			if (a.until_full) {
				printf("full at %lld: %s\n", i, err);
				fflush(stdout);
				atomic_store(&full_hit, 1);
				atomic_store(&sender_done, 1);
				return NULL;
			}
			usleep(20000);
		}
		if (rc) {
			fprintf(stderr, "sdk_gw: send %lld: %s (%s)\n", i, err, iothub_gw_strerror(rc));
			exit(1);
		}
		logline(acc_fd, "%lld\n", i);
		if (a.rate > 0) {
			int64_t due = t0 + (i - a.start + 1) * 1000 / a.rate;

			while (mono_ms() < due)
				usleep(1000);
		}
	}
	if (a.bench) {
		int64_t ms = mono_ms() - t0;

		printf("spooled %lld readings in %" PRId64 " ms: %.0f readings/s\n",
		       a.count - a.start, ms, (double)(a.count - a.start) * 1000.0 / (ms ? ms : 1));
		fflush(stdout);
	}
	atomic_store(&sender_done, 1);
	return NULL;
}

static int token_cb(struct iothub_gw *g, char *buf, size_t cap, void *user)
{
	FILE *f = fopen(a.token_file, "r");
	int ok = f && fgets(buf, (int)cap, f);

	if (f)
		fclose(f);
	buf[strcspn(buf, "\r\n")] = 0;
	return ok && buf[0] ? 0 : -1;
}

static void on_reject(struct iothub_gw *g, const struct iothub_gw_reject *r, void *user)
{
	printf("reject %s %s\n", r->code, r->reading_json ? r->reading_json : r->detail_json);
	fflush(stdout);
}

static void on_state(struct iothub_gw *g, enum iothub_gw_state s, int code, const char *why,
		     void *user)
{
	static const char *const names[] = { "connecting", "online", "disconnected" };

	if (!a.bench)
		fprintf(stderr, "sdk_gw: %s %d %s\n", names[s], code, why);
}

static void on_cmd(struct iothub_gw *g, const struct iothub_gw_command *c, void *user)
{
	logline(cmd_fd, "run %s %s %d %s\n", c->id, c->name, c->attempt, c->params_json);
	iothub_gw_cmd_in_progress(g, c->id, 50, "halfway");
	if (!strcmp(c->name, "firmware_update"))
		iothub_gw_cmd_failed(g, c->id, "no firmware here");
	else
		iothub_gw_cmd_succeeded(g, c->id, "{\"done\":true}");
}

static void on_cancel(struct iothub_gw *g, const char *id, const char *dev, void *user)
{
	logline(cmd_fd, "cancel %s %s\n", id, dev);
}

static void on_term(int sig)
{
	got_term = 1;
}

static void usage(void)
{
	fprintf(stderr, "usage: sdk_gw --url U --token T --spool DIR --devices a,b [...]\n");
	exit(1);
}

int main(int argc, char **argv)
{
	struct iothub_gw_opts o = { 0 };
	struct iothub_gw_stats st;
	char err[256];
	pthread_t th;
	int rc = 0;

	for (int i = 1; i < argc; i++) {
		const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;

#define ARG(name) (!strcmp(k, name) && v && (i++, 1))
		if (ARG("--url")) a.url = v;
		else if (ARG("--token")) a.token = v;
		else if (ARG("--spool")) a.spool = v;
		else if (ARG("--type")) a.type = v;
		else if (ARG("--accepted")) a.accepted = v;
		else if (ARG("--commands")) a.commands = v;
		else if (ARG("--ca")) a.ca = v;
		else if (ARG("--cert")) a.cert = v;
		else if (ARG("--key")) a.key = v;
		else if (ARG("--token-file")) a.token_file = v;
		else if (ARG("--sign-seed")) a.sign_seed = v;
		else if (ARG("--count")) a.count = atoll(v);
		else if (ARG("--start")) a.start = atoll(v);
		else if (ARG("--ts-base")) a.ts_base = atoll(v);
		else if (ARG("--rate")) a.rate = atoll(v);
		else if (ARG("--bad-every")) a.bad_every = atoll(v);
		else if (ARG("--serve-ms")) a.serve_ms = atoll(v);
		else if (ARG("--ack-timeout")) a.ack_timeout = atoll(v);
		else if (ARG("--max-spool")) a.max_spool = (size_t)atoll(v);
		else if (ARG("--segment")) a.segment = (size_t)atoll(v);
		else if (ARG("--fsync"))
			a.fsync = !strcmp(v, "always") ? IOTHUB_GW_FSYNC_ALWAYS :
				  !strcmp(v, "batch") ? IOTHUB_GW_FSYNC_BATCH : IOTHUB_GW_FSYNC_NONE;
		else if (ARG("--devices")) {
			char *s = strdup(v), *save = NULL;

			for (char *t = strtok_r(s, ",", &save); t && a.ndevs < 256;
			     t = strtok_r(NULL, ",", &save))
				a.devs[a.ndevs++] = t;
		} else if (!strcmp(k, "--until-full")) a.until_full = 1;
		else if (!strcmp(k, "--bench")) a.bench = 1;
		else if (!strcmp(k, "--poll")) a.poll = 1;
		else usage();
#undef ARG
	}
	if (!a.url || !(a.token || a.token_file) || !a.spool || !a.ndevs)
		usage();
	if (!a.ts_base)
		a.ts_base = (long long)time(NULL) * 1000 - 3600 * 1000;
	signal(SIGTERM, on_term);
	signal(SIGINT, on_term);
	signal(SIGPIPE, SIG_IGN);
	if (a.accepted && (acc_fd = open(a.accepted, O_WRONLY | O_CREAT | O_APPEND, 0644)) < 0)
		return perror(a.accepted), 1;
	if (a.commands && (cmd_fd = open(a.commands, O_WRONLY | O_CREAT | O_APPEND, 0644)) < 0)
		return perror(a.commands), 1;
	o.url = a.url;
	o.token = a.token;
	if (a.token_file)
		o.token_cb = token_cb;
	o.ca_file = a.ca;
	o.cert_file = a.cert;
	o.key_file = a.key;
	o.spool_dir = a.spool;
	o.fsync = a.fsync;
	o.max_spool_bytes = a.max_spool;
	o.segment_bytes = a.segment;
	o.on_reject = on_reject;
	o.on_state = on_state;
	o.ack_timeout_ms = (int)a.ack_timeout;
	if (a.sign_seed) { /* 64 hex digits: the Ed25519 private key's seed */
		unsigned char seed[32];
		for (int i = 0; i < 32; i++) {
			unsigned x;
			if (strlen(a.sign_seed) != 64 || sscanf(a.sign_seed + 2 * i, "%2x", &x) != 1)
				usage();
			seed[i] = (unsigned char)x;
		}
		sign_key = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, seed, 32);
		if (!sign_key)
			usage();
		o.sign_cb = sign_cb;
	}
	o.backoff_min_ms = 100;
	o.backoff_max_ms = 2000;
	gw = iothub_gw_new(&o, err, sizeof(err));
	if (!gw) {
		fprintf(stderr, "sdk_gw: %s\n", err);
		return 1;
	}
	iothub_gw_on_command(gw, NULL, on_cmd, NULL);
	iothub_gw_on_cancel(gw, on_cancel, NULL);
	for (int i = 0; i < a.ndevs; i++)
		if (iothub_gw_announce(gw, a.devs[i], a.type, "{\"suite\":\"sdk\"}", err, sizeof(err))) {
			fprintf(stderr, "sdk_gw: announce: %s\n", err);
			return 1;
		}
	iothub_gw_stats(gw, &st);
	fprintf(stderr, "sdk_gw: replayed %" PRIu64 " pending readings, next seq %" PRIu64 "\n",
		st.pending, st.next_seq);
	if (pthread_create(&th, NULL, sender, NULL))
		return 1;
	/* serve while sending, then until everything is acked (or serve_ms) */
	int64_t serve_end = a.serve_ms ? mono_ms() + a.serve_ms : 0;
	int64_t drain_end = 0;
	long long turns = 0;
	while (!got_term) {
		if (a.poll) {
			short ev;
			struct pollfd pfd = { .fd = iothub_gw_fd(gw, &ev) };
			int t = iothub_gw_next_timeout(gw);

			pfd.events = ev;
			poll(&pfd, 1, t > 100 ? 100 : t);
			iothub_gw_service(gw, 0);
			turns++;
		} else {
			iothub_gw_service(gw, 100);
		}
		if (serve_end) {
			if (mono_ms() >= serve_end)
				break;
			continue;
		}
		if (!atomic_load(&sender_done))
			continue;
		if (atomic_load(&full_hit)) {
			rc = 3;
			break;
		}
		iothub_gw_stats(gw, &st);
		if (!st.pending)
			break;
		if (!drain_end)
			drain_end = mono_ms() + 120000;
		if (mono_ms() > drain_end) {
			rc = 2;
			break;
		}
	}
	if (got_term)
		iothub_gw_stop(gw);
	pthread_join(th, NULL);
	iothub_gw_stats(gw, &st);
	printf("stats accepted=%" PRIu64 " acked=%" PRIu64 " duplicates=%" PRIu64
	       " rejected=%" PRIu64 " rate_limited=%" PRIu64 " unavailable=%" PRIu64
	       " frames=%" PRIu64 " reconnects=%" PRIu64 " pending=%" PRIu64
	       " spool_bytes=%" PRIu64 " ack_timeouts=%" PRIu64 "\n",
	       st.accepted, st.acked, st.duplicates, st.rejected, st.rate_limited, st.unavailable,
	       st.frames_sent, st.reconnects, st.pending, st.spool_bytes, st.ack_timeouts);
	if (a.poll)
		printf("poll turns=%lld\n", turns);
	fflush(stdout);
	iothub_gw_free(gw);
	EVP_PKEY_free(sign_key);
	return rc;
}
