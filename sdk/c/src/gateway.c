/*
 * gateway.c - libiothub-gw's gateway: the connection to the hub on its own
 * lws context (client API, poll backend), the announcement, the outbox
 * driven into telemetry frames, acks and their rejects, commands and their
 * acks, reconnects with back-off and jitter (iothub/gateway.h).
 *
 * Locking: gw->mu guards the outbox, the devices, the command table and the
 * outgoing command acks, which other threads reach through send(),
 * announce() and cmd_report(). The service thread takes it in short
 * sections and never calls the application with it held: callbacks are
 * collected (struct later) and run after the lock is dropped.
 *
 * lws 4.1.6 facts relied on (as tools/client.c found them): RECEIVE must
 * return 0 (a close waits for WRITEABLE), lws_write() masks the payload in
 * place, WSI_DESTROY comes once per wsi (also for a connect that failed
 * inside lws_client_connect_via_info()), a refused upgrade shows its status
 * in ESTABLISHED_CLIENT_HTTP, and lws_service() ignores its timeout beyond
 * "wait or not": a timer bounds the wait.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include <libwebsockets.h>
#include <openssl/x509.h>

#define SUBPROTOCOL   "iot-gateway.v1"
#define CMD_RING      1024
#define ANNOUNCE_MAX  1000
#define RX_MAX        (1u << 20)
#define TOKEN_MAX     8192

struct dev {
	char *id, *type, *labels;   /* labels: compact JSON object or NULL */
	int announced;              /* on this connection */
};

struct cmd_ent {
	char id[72];
	char *last_ack;             /* the last command_ack queued for it */
};

struct out_msg {
	struct out_msg *next;
	size_t len;
	char data[];
};

struct handler {
	char *name;                 /* NULL: the default */
	iothub_gw_command_cb cb;
	void *user;
};

enum later_kind { L_REJECT, L_COMMAND, L_CANCEL };

struct later {
	enum later_kind kind;
	struct iothub_gw_reject r;
	char *s1, *s2, *s3, *s4, *s5;   /* owned strings the kind refers to */
	struct iothub_gw_command c;
};

struct laters {
	struct later *v;
	size_t n, cap;
};

struct iothub_gw {
	/* options, copied */
	char *host, *path, *host_hdr, *token_static, *ca, *cert, *key;
	int port, tls, insecure;
	iothub_gw_token_cb token_cb;
	void *token_user;
	iothub_gw_reject_cb on_reject;
	iothub_gw_sign_cb sign_cb;
	void *sign_user;
	iothub_gw_state_cb on_state;
	void *user;
	size_t max_readings, max_frame_bytes;
	int max_delay_ms, max_inflight, fsync_ms, bo_min, bo_max, ack_timeout_ms;
	enum iothub_gw_fsync fsync;

	pthread_mutex_t mu;
	struct outbox ob;
	struct dev *devs;
	size_t ndevs;
	int devs_new;               /* some device is not announced yet */
	struct cmd_ent ring[CMD_RING];
	size_t ring_next;
	int cmd_fd;                 /* <spool>/commands.log, -1: none */
	size_t cmd_lines;
	struct out_msg *q, *q_tail; /* command acks to send */
	int64_t q_not_before;       /* after a rate_limited (mono ms) */
	int64_t batch_since;        /* mono ms the oldest unframed reading came, 0 none */
	int wake_pending;
	uint64_t st_accepted, st_acked, st_dups, st_rejected, st_rl, st_unavail, st_frames,
		 st_reconnects, st_ack_timeouts, st_frames_acked;

	/* service thread only */
	struct handler *h;
	size_t nh;
	iothub_gw_cancel_cb on_cancel;
	void *cancel_user;
	struct lws_context *lws;
	struct lws_protocols protocols[2];
	struct lws *wsi;
	int connecting, opened, online, closing, destroying, started;
	int announce_wait;          /* announces not answered yet */
	int64_t announce_sent_at;   /* mono ms the oldest unanswered one went */
	int64_t announce_retry_at;
	int64_t reconnect_at;       /* mono ms, 0: not scheduled */
	int64_t pause_until;        /* telemetry held until (mono ms) */
	int64_t fsync_at;
	int backoff_n;
	int inflight;
	int http_status, close_code;
	char close_reason[128], conn_error[160];
	char token[TOKEN_MAX];
	char auth[TOKEN_MAX + 8];
	struct gbuf rx, tx;
	int rx_drop;
	uint64_t rng;
	atomic_int stopped;
	lws_sorted_usec_list_t sul_tick, sul_wake;
	int64_t tick_at;            /* mono ms sul_tick is due */
	int epfd;                   /* iothub_gw_fd(): the socket and wakefd */
	int wakefd;                 /* in epfd: wake() from other threads */
	int sockfd;                 /* the socket last added to epfd, -1 none */
	int want_write;             /* WRITEABLE asked for, not yet had */
};

static void schedule(struct iothub_gw *gw);

/* ------------------------------------------------------------------------ */
/* small things                                                               */

static uint64_t rnd(struct iothub_gw *gw)
{
	gw->rng ^= gw->rng << 13;
	gw->rng ^= gw->rng >> 7;
	gw->rng ^= gw->rng << 17;
	return gw->rng;
}

static void set_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

static void later_add(struct laters *l, const struct later *x)
{
	if (l->n == l->cap) {
		l->cap = l->cap ? l->cap * 2 : 8;
		l->v = gw_xrealloc(l->v, l->cap * sizeof(*l->v));
	}
	l->v[l->n++] = *x;
}

static void state(struct iothub_gw *gw, enum iothub_gw_state s, int code, const char *why)
{
	if (gw->on_state && !gw->destroying)
		gw->on_state(gw, s, code, why ? why : "", gw->user);
}

/* ------------------------------------------------------------------------ */
/* the URL                                                                    */

static int parse_url(struct iothub_gw *gw, const char *url, char *err, size_t errlen)
{
	const char *h, *he, *pe;

	if (!url) {
		set_err(err, errlen, "no url");
		return -1;
	}
	if (!strncmp(url, "ws://", 5)) {
		h = url + 5;
	} else if (!strncmp(url, "wss://", 6)) {
		h = url + 6;
		gw->tls = 1;
	} else {
		set_err(err, errlen, "url: expected ws://HOST[:PORT]/PATH or wss://..., got '%.200s'", url);
		return -1;
	}
	pe = h + strcspn(h, "/?#");
	if (*h == '[') {
		he = memchr(h, ']', (size_t)(pe - h));
		if (!he) {
			set_err(err, errlen, "url: unterminated [ in '%.200s'", url);
			return -1;
		}
		gw->host = strndup(h + 1, (size_t)(he - h - 1));
		he++;
	} else {
		he = memchr(h, ':', (size_t)(pe - h));
		he = he ? he : pe;
		gw->host = strndup(h, (size_t)(he - h));
	}
	if (!gw->host)
		abort();
	gw->port = gw->tls ? 443 : 80;
	if (*he == ':') {
		char *end;
		long p = strtol(he + 1, &end, 10);

		if (end != pe || p < 1 || p > 65535) {
			set_err(err, errlen, "url: bad port in '%.200s'", url);
			return -1;
		}
		gw->port = (int)p;
	}
	if (!*gw->host) {
		set_err(err, errlen, "url: no host in '%.200s'", url);
		return -1;
	}
	gw->path = gw_xstrdup(*pe == '/' ? pe : "/v1/gateway");
	struct gbuf b = { 0 };
	gbuf_printf(&b, strchr(gw->host, ':') ? "[%s]" : "%s", gw->host);
	if (gw->port != (gw->tls ? 443 : 80))
		gbuf_printf(&b, ":%d", gw->port);
	gw->host_hdr = b.data;
	return 0;
}

/* ------------------------------------------------------------------------ */
/* outgoing messages                                                          */

/* Queues a command_ack (copy); lock held. */
static void q_push(struct iothub_gw *gw, const char *msg, size_t len)
{
	struct out_msg *m = gw_xmalloc(sizeof(*m) + len);

	m->next = NULL;
	m->len = len;
	memcpy(m->data, msg, len);
	if (gw->q_tail)
		gw->q_tail->next = m;
	else
		gw->q = m;
	gw->q_tail = m;
}

static struct cmd_ent *cmd_find(struct iothub_gw *gw, const char *id)
{
	for (size_t i = 0; i < CMD_RING; i++)
		if (gw->ring[i].last_ack && !strcmp(gw->ring[i].id, id))
			return &gw->ring[i];
	return NULL;
}

/* The command table survives restarts in <spool>/commands.log: one line
 * "<crc32> <command_ack json>" per status reported, the last line of an id
 * winning; rewritten from the table when it grows past 4 x CMD_RING lines.
 * Lock held (or start-up). */
static void cmd_ent_set(struct iothub_gw *gw, const char *id, char *ack)
{
	struct cmd_ent *c = cmd_find(gw, id);

	if (!c) {
		c = &gw->ring[gw->ring_next];
		gw->ring_next = (gw->ring_next + 1) % CMD_RING;
		snprintf(c->id, sizeof(c->id), "%s", id);
	}
	free(c->last_ack);
	c->last_ack = ack;
}

static int cmd_write_line(int fd, const char *ack)
{
	struct gbuf b = { 0 };
	int rc;

	gbuf_printf(&b, "%08x %s\n", gw_crc32(ack, strlen(ack)), ack);
	rc = write(fd, b.data, b.len) == (ssize_t)b.len ? 0 : -1;
	gbuf_free(&b);
	return rc;
}

static void cmd_persist(struct iothub_gw *gw, const char *ack)
{
	if (gw->cmd_fd < 0)
		return;
	if (gw->cmd_lines >= 4 * CMD_RING) {
		char path[4200], tmp[4210];
		int fd;

		snprintf(path, sizeof(path), "%s/commands.log", gw->ob.dir);
		snprintf(tmp, sizeof(tmp), "%s.tmp", path);
		fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		if (fd >= 0) {
			gw->cmd_lines = 0;
			for (size_t i = 1; i <= CMD_RING; i++) {
				struct cmd_ent *c = &gw->ring[(gw->ring_next + i) % CMD_RING];

				if (c->last_ack && c->last_ack != ack && !cmd_write_line(fd, c->last_ack))
					gw->cmd_lines++;
			}
			if (gw->fsync != IOTHUB_GW_FSYNC_NONE)
				fdatasync(fd);
			if (!rename(tmp, path)) {
				close(gw->cmd_fd);
				gw->cmd_fd = fd;
			} else {
				close(fd);
			}
		}
	}
	if (!cmd_write_line(gw->cmd_fd, ack))
		gw->cmd_lines++;
	if (gw->fsync != IOTHUB_GW_FSYNC_NONE)
		fdatasync(gw->cmd_fd);
}

static void cmd_load(struct iothub_gw *gw)
{
	char path[4200];
	FILE *f;
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;

	snprintf(path, sizeof(path), "%s/commands.log", gw->ob.dir);
	f = fopen(path, "re");
	while (f && (n = getline(&line, &cap, f)) > 0) {
		json_t *m, *id;
		unsigned long crc;
		char *end;

		if (line[n - 1] != '\n' || n < 11 || line[8] != ' ')
			break;
		line[--n] = 0;
		crc = strtoul(line, &end, 16);
		if (end != line + 8 || gw_crc32(line + 9, (size_t)n - 9) != (uint32_t)crc)
			break;
		m = json_loads(line + 9, 0, NULL);
		id = json_object_get(m, "id");
		if (json_is_string(id) && strlen(json_string_value(id)) <= 64)
			cmd_ent_set(gw, json_string_value(id), gw_xstrdup(line + 9));
		json_decref(m);
		gw->cmd_lines++;
	}
	free(line);
	if (f)
		fclose(f);
	gw->cmd_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
}

static void tx_begin(struct iothub_gw *gw)
{
	if (gw->tx.cap < LWS_PRE + 256) {
		gw->tx.data = gw_xrealloc(gw->tx.data, LWS_PRE + 256);
		gw->tx.cap = LWS_PRE + 256;
	}
	memset(gw->tx.data, 0, LWS_PRE);
	gw->tx.len = LWS_PRE;
}

static int tx_write(struct iothub_gw *gw)
{
	size_t n = gw->tx.len - LWS_PRE;

	return lws_write(gw->wsi, (unsigned char *)gw->tx.data + LWS_PRE, n, LWS_WRITE_TEXT) <
	       (int)n ? -1 : 0;
}

/* An announce of the devices not announced yet (up to ANNOUNCE_MAX and about
 * 60 KB); lock held. Returns 1 when one was built into tx. */
static int build_announce(struct iothub_gw *gw)
{
	size_t n = 0;

	tx_begin(gw);
	gbuf_puts(&gw->tx, "{\"type\":\"announce\",\"devices\":[");
	for (size_t i = 0; i < gw->ndevs && n < ANNOUNCE_MAX && gw->tx.len < 60000; i++) {
		struct dev *d = &gw->devs[i];

		if (d->announced)
			continue;
		gbuf_printf(&gw->tx, "%s{\"device\":\"%s\",\"device_type\":\"%s\"", n ? "," : "",
			    d->id, d->type);
		if (d->labels)
			gbuf_printf(&gw->tx, ",\"labels\":%s", d->labels);
		gbuf_puts(&gw->tx, "}");
		d->announced = 1;
		n++;
	}
	gbuf_puts(&gw->tx, "]}");
	gw->devs_new = 0;
	for (size_t i = 0; i < gw->ndevs; i++)
		if (!gw->devs[i].announced)
			gw->devs_new = 1;
	return n > 0;
}

/* The first unsent frame as a telemetry message in tx; lock held. */
static struct ob_frame *build_frame(struct iothub_gw *gw)
{
	struct outbox *o = &gw->ob;

	for (size_t i = o->fr_head; i < o->fr_len; i++) {
		struct ob_frame *f = &o->fr[i];
		size_t k;
		int first = 1;

		if (f->state != FR_UNSENT)
			continue;
		tx_begin(gw);
		gbuf_printf(&gw->tx, "{\"type\":\"telemetry\",\"seq\":%" PRIu64 ",\"readings\":[",
			    f->seq);
		for (k = ob_frame_first(o, f); k < o->rd_len && o->rd[k].rid < f->first_rid + f->n;
		     k++) {
			if (!first)
				gbuf_add(&gw->tx, ",", 1);
			gbuf_add(&gw->tx, o->rd[k].json, o->rd[k].len);
			first = 0;
		}
		gbuf_puts(&gw->tx, "]}");
		return f;
	}
	return NULL;
}

static int64_t now_mono(void)
{
	return gw_mono_ms();
}

/* From WRITEABLE: one message. Returns -1 to close. */
static int on_writeable(struct iothub_gw *gw)
{
	int64_t now = now_mono();
	int more = 0, rc = 0, wrote = 0;

	if (gw->closing)
		return -1;
	pthread_mutex_lock(&gw->mu);
	if (gw->devs_new && now >= gw->announce_retry_at) {
		if (build_announce(gw)) {
			if (!gw->announce_wait++)
				gw->announce_sent_at = now;
			rc = tx_write(gw);
			wrote = 1;
		}
	}
	if (!wrote && gw->q && now >= gw->q_not_before) {
		struct out_msg *m = gw->q;

		gw->q = m->next;
		if (!gw->q)
			gw->q_tail = NULL;
		tx_begin(gw);
		gbuf_add(&gw->tx, m->data, m->len);
		free(m);
		rc = tx_write(gw);
		wrote = 1;
	}
	if (!wrote && !gw->announce_wait && !gw->devs_new && now >= gw->pause_until &&
	    gw->inflight < gw->max_inflight) {
		struct ob_frame *f = build_frame(gw);

		if (f) {
			f->state = FR_INFLIGHT;
			f->sent_at = now;
			gw->inflight++;
			gw->st_frames++;
			rc = tx_write(gw);
			wrote = 1;
		}
	}
	/* more to write now? */
	if ((gw->devs_new && now >= gw->announce_retry_at) || (gw->q && now >= gw->q_not_before))
		more = 1;
	if (!more && !gw->announce_wait && !gw->devs_new && now >= gw->pause_until &&
	    gw->inflight < gw->max_inflight)
		for (size_t i = gw->ob.fr_head; i < gw->ob.fr_len && !more; i++)
			more = gw->ob.fr[i].state == FR_UNSENT;
	pthread_mutex_unlock(&gw->mu);
	if (rc)
		return -1;
	if (more) {
		gw->want_write = 1;
		lws_callback_on_writable(gw->wsi);
	}
	return 0;
}

/* The mono ms by which the oldest answer the connection waits for (an ack
 * or an announced) is overdue, 0 when it waits for none; lock held. */
static int64_t answer_due(struct iothub_gw *gw, uint64_t *seq)
{
	int64_t due = 0;
	int seen = 0;

	*seq = 0;
	if (gw->ack_timeout_ms < 0 || !gw->opened)
		return 0;
	if (gw->announce_wait)
		due = gw->announce_sent_at + gw->ack_timeout_ms;
	/* frames go out in seq order: the first in flight is the oldest */
	for (size_t i = gw->ob.fr_head; i < gw->ob.fr_len && seen < gw->inflight; i++) {
		struct ob_frame *f = &gw->ob.fr[i];

		if (f->state != FR_INFLIGHT)
			continue;
		seen++;
		if (!due || f->sent_at + gw->ack_timeout_ms < due) {
			due = f->sent_at + gw->ack_timeout_ms;
			*seq = f->seq;
		}
	}
	return due;
}

/* The hub did not answer in time: a stopped hub, a black-holed path, a
 * half-open socket all look like this one, and the protocol has no other
 * remedy for them than the one for a lost connection (a resend on the same
 * socket would queue behind what the hub has not read): give the connection
 * up, so the unacked frames go again with their seq on a new one (the hub
 * acks a frame it did store "duplicate":true). Not from lws's callback for
 * this wsi: the close is asynchronous. */
static void give_up(struct iothub_gw *gw, uint64_t seq)
{
	if (seq)
		snprintf(gw->conn_error, sizeof(gw->conn_error),
			 "no ack for seq %" PRIu64 " within %d ms: connection given up", seq,
			 gw->ack_timeout_ms);
	else
		snprintf(gw->conn_error, sizeof(gw->conn_error),
			 "no answer to the announce within %d ms: connection given up",
			 gw->ack_timeout_ms);
	gw->closing = 1;
	pthread_mutex_lock(&gw->mu);
	gw->st_ack_timeouts++;
	pthread_mutex_unlock(&gw->mu);
	lws_set_timeout(gw->wsi, PENDING_TIMEOUT_USER_OK, LWS_TO_KILL_ASYNC);
}

/* Frames what is due and asks for WRITEABLE when something can go. */
static void pump(struct iothub_gw *gw)
{
	int64_t now = now_mono(), due;
	uint64_t late_seq;
	int want = 0;

	pthread_mutex_lock(&gw->mu);
	gw->wake_pending = 0;
	for (;;) {
		size_t first, n = ob_unframed(&gw->ob, &first);

		if (!n) {
			gw->batch_since = 0;
			break;
		}
		if (n < gw->max_readings && gw->batch_since &&
		    now < gw->batch_since + gw->max_delay_ms)
			break;
		if (!gw->batch_since && n < gw->max_readings) {
			gw->batch_since = now;
			break;
		}
		if (ob_make_frame(&gw->ob, gw->max_readings, gw->max_frame_bytes))
			break;   /* disk trouble: try again on the next tick */
		gw->batch_since = ob_unframed(&gw->ob, NULL) ? now : 0;
	}
	if (gw->fsync == IOTHUB_GW_FSYNC_BATCH && gw->ob.dirty && now >= gw->fsync_at) {
		ob_sync(&gw->ob);
		gw->fsync_at = now + gw->fsync_ms;
	}
	due = gw->opened && !gw->closing ? answer_due(gw, &late_seq) : 0;
	if (gw->opened && !gw->closing) {
		if ((gw->devs_new && now >= gw->announce_retry_at) ||
		    (gw->q && now >= gw->q_not_before))
			want = 1;
		if (!gw->announce_wait && !gw->devs_new && now >= gw->pause_until && gw->inflight < gw->max_inflight)
			for (size_t i = gw->ob.fr_head; i < gw->ob.fr_len && !want; i++)
				want = gw->ob.fr[i].state == FR_UNSENT;
	}
	pthread_mutex_unlock(&gw->mu);
	if (due && now >= due)
		give_up(gw, late_seq);
	else if (want) {
		gw->want_write = 1;
		lws_callback_on_writable(gw->wsi);
	}
	schedule(gw);
}

/* ------------------------------------------------------------------------ */
/* connecting                                                                 */

static const lws_retry_bo_t keepalive = {
	.secs_since_valid_ping = 20,
	.secs_since_valid_hangup = 60,
};

static void connect_now(struct iothub_gw *gw)
{
	struct lws_client_connect_info ci;

	gw->reconnect_at = 0;
	if (gw->token_cb) {
		char buf[TOKEN_MAX];

		buf[0] = 0;
		if (!gw->token_cb(gw, buf, sizeof(buf), gw->token_user) && buf[0])
			snprintf(gw->token, sizeof(gw->token), "%s", buf);
	}
	snprintf(gw->auth, sizeof(gw->auth), "Bearer %s", gw->token);
	gw->http_status = gw->close_code = 0;
	gw->close_reason[0] = gw->conn_error[0] = 0;
	gw->opened = gw->online = gw->closing = 0;
	gw->rx.len = 0;
	gw->rx_drop = 0;
	memset(&ci, 0, sizeof(ci));
	ci.context = gw->lws;
	ci.retry_and_idle_policy = &keepalive;
	ci.address = gw->host;
	ci.port = gw->port;
	ci.path = gw->path;
	ci.host = gw->host_hdr;
	ci.origin = gw->host_hdr;
	ci.protocol = SUBPROTOCOL;
	ci.local_protocol_name = "iothub-gw";
	ci.opaque_user_data = gw;
	if (gw->tls) {
		ci.ssl_connection = LCCSCF_USE_SSL;
		if (gw->insecure)
			ci.ssl_connection |= LCCSCF_ALLOW_SELFSIGNED | LCCSCF_ALLOW_EXPIRED |
				LCCSCF_SKIP_SERVER_CERT_HOSTNAME_CHECK | LCCSCF_ALLOW_INSECURE;
	}
	state(gw, IOTHUB_GW_CONNECTING, 0, NULL);
	gw->connecting = 1;
	gw->wsi = (struct lws *)1;   /* a connection exists from here on */
	struct lws *w = lws_client_connect_via_info(&ci);
	gw->connecting = 0;
	if (!w) {
		/* WSI_DESTROY may have come already and scheduled the retry */
		if (gw->wsi == (struct lws *)1) {
			gw->wsi = NULL;
			gw->reconnect_at = now_mono() + gw->bo_min;
		}
	} else if (gw->wsi == (struct lws *)1) {
		gw->wsi = w;
	}
}

static int64_t backoff_ms(struct iothub_gw *gw)
{
	int64_t d = gw->bo_min;

	for (int i = 0; i < gw->backoff_n && d < gw->bo_max; i++)
		d *= 2;
	if (d > gw->bo_max)
		d = gw->bo_max;
	if (gw->backoff_n < 30)
		gw->backoff_n++;
	/* +-50 % */
	return d / 2 + (int64_t)(rnd(gw) % (uint64_t)(d + 1));
}

static void conn_gone(struct iothub_gw *gw)
{
	int64_t delay;
	int code;
	const char *why;

	gw->wsi = NULL;
	gw->opened = gw->online = gw->closing = 0;
	pthread_mutex_lock(&gw->mu);
	for (size_t i = gw->ob.fr_head; i < gw->ob.fr_len; i++)
		if (gw->ob.fr[i].state == FR_INFLIGHT)
			gw->ob.fr[i].state = FR_UNSENT;
	for (size_t i = 0; i < gw->ndevs; i++)
		gw->devs[i].announced = 0;
	gw->devs_new = gw->ndevs > 0;
	gw->st_reconnects++;
	pthread_mutex_unlock(&gw->mu);
	gw->inflight = 0;
	gw->announce_wait = 0;
	gw->announce_retry_at = 0;
	gw->pause_until = 0;
	if (gw->destroying)
		return;
	delay = backoff_ms(gw);
	code = gw->close_code ? gw->close_code : gw->http_status != 101 ? gw->http_status : 0;
	why = gw->close_reason[0] ? gw->close_reason : gw->conn_error;
	if (gw->close_code == 4029) {
		/* "reconnecting faster than gateway-connect-rate; retry after N ms" */
		const char *p = strstr(gw->close_reason, "retry after ");
		long ms = p ? strtol(p + 12, NULL, 10) : 0;

		if (ms > delay)
			delay = ms + (int64_t)(rnd(gw) % 250);
	}
	gw->reconnect_at = now_mono() + delay;
	state(gw, IOTHUB_GW_DISCONNECTED, code, why);
	schedule(gw);
}

/* ------------------------------------------------------------------------ */
/* incoming messages                                                          */

static void reject_later(struct laters *l, uint64_t seq, json_t *e, const char *reading)
{
	struct later x = { .kind = L_REJECT };
	json_t *v;

	x.s1 = json_dumps(e, JSON_COMPACT);
	v = json_object_get(e, "device");
	x.s2 = json_is_string(v) ? gw_xstrdup(json_string_value(v)) : NULL;
	v = json_object_get(e, "code");
	x.s3 = gw_xstrdup(json_is_string(v) ? json_string_value(v) : "unknown");
	x.s4 = reading ? gw_xstrdup(reading) : NULL;
	v = json_object_get(e, "index");
	x.r.seq = seq;
	x.r.index = json_is_integer(v) ? (int)json_integer_value(v) : -1;
	later_add(l, &x);
}

/* lock held */
static void on_ack(struct iothub_gw *gw, struct gwm *m, struct laters *l)
{
	struct ob_frame *f = ob_frame(&gw->ob, m->seq);
	int64_t rl_retry = -1;
	size_t i, nread = 0, first;
	json_t *e;

	if (!f || f->state == FR_ACKED)
		return;   /* an ack we did not wait for: nothing to do */
	if (f->state == FR_INFLIGHT && gw->inflight > 0)
		gw->inflight--;
	first = ob_frame_first(&gw->ob, f);
	while (first + nread < gw->ob.rd_len && gw->ob.rd[first + nread].rid < f->first_rid + f->n)
		nread++;
	/* copy what the rejects need before the outbox moves */
	json_array_foreach(m->rejected, i, e) {
		json_t *ix = json_object_get(e, "index"), *code = json_object_get(e, "code");
		const struct ob_reading *r = NULL;

		if (json_is_integer(ix) && json_integer_value(ix) >= 0 &&
		    (size_t)json_integer_value(ix) < nread)
			r = &gw->ob.rd[first + (size_t)json_integer_value(ix)];
		if (r && json_is_string(code) && !strcmp(json_string_value(code), "rate_limited")) {
			json_t *ra = json_object_get(e, "retry_after_ms");
			int64_t w = json_is_integer(ra) ? json_integer_value(ra) : 1000;
			char *copy = gw_xstrdup(r->json);

			/* not stored: it goes again, as a new reading, after the wait;
			 * appended before the frame's A record, or reported when the
			 * disk refuses, never dropped in silence */
			int lost = ob_append(&gw->ob, copy, strlen(copy), 0, NULL, 0);

			first = ob_frame_first(&gw->ob, ob_frame(&gw->ob, m->seq));
			if (lost) {
				gw->st_rejected++;
				reject_later(l, m->seq, e, copy);
				free(copy);
				continue;
			}
			free(copy);
			gw->st_rl++;
			if (w > rl_retry)
				rl_retry = w;
			continue;
		}
		gw->st_rejected++;
		reject_later(l, m->seq, e, r ? r->json : NULL);
	}
	if (rl_retry >= 0) {
		int64_t until = now_mono() + rl_retry;

		if (until > gw->pause_until)
			gw->pause_until = until;
	}
	gw->st_acked += (uint64_t)(m->accepted > 0 ? m->accepted : 0);
	gw->st_frames_acked++;
	if (m->duplicate)
		gw->st_dups++;
	ob_acked(&gw->ob, m->seq);
}

/* lock held */
static void on_frame_error(struct iothub_gw *gw, struct gwm *m, struct laters *l)
{
	struct ob_frame *f = ob_frame(&gw->ob, m->seq);

	if (!f || f->state == FR_ACKED)
		return;
	if (f->state == FR_INFLIGHT && gw->inflight > 0)
		gw->inflight--;
	if (!strcmp(m->code, "unavailable") || !strcmp(m->code, "rate_limited")) {
		int64_t until = now_mono() + (m->retry_after_ms >= 0 ? m->retry_after_ms : 1000);

		f->state = FR_UNSENT;
		gw->st_unavail++;
		if (until > gw->pause_until)
			gw->pause_until = until;
		/* later frames already sent get the same answer: resent in order */
		return;
	}
	/* bad_message: nothing of it was stored, and resending cannot help */
	for (size_t k = ob_frame_first(&gw->ob, f), i = 0;
	     k < gw->ob.rd_len && gw->ob.rd[k].rid < f->first_rid + f->n; k++, i++) {
		json_t *e = json_pack("{s:I,s:s,s:s}", "index", (json_int_t)i, "code", m->code,
				      "message", m->message ? m->message : "");

		gw->st_rejected++;
		reject_later(l, m->seq, e, gw->ob.rd[k].json);
		json_decref(e);
	}
	ob_acked(&gw->ob, m->seq);
}

static char *ack_msg(const char *id, const char *status, int progress, const char *message,
		     json_t *result)
{
	json_t *o = json_pack("{s:s,s:s,s:s}", "type", "command_ack", "id", id, "status", status);
	char *s;

	if (progress >= 0 && !strcmp(status, "in_progress"))
		json_object_set_new(o, "progress", json_integer(progress > 100 ? 100 : progress));
	if (message && *message)
		json_object_set_new(o, !strcmp(status, "failed") || !strcmp(status, "rejected") ?
				    "error" : "message", json_string(message));
	if (result)
		json_object_set(o, "result", result);
	s = json_dumps(o, JSON_COMPACT);
	json_decref(o);
	if (!s)
		abort();
	return s;
}

/* lock held; the command's first delivery, or a redelivery */
static void on_command(struct iothub_gw *gw, struct gwm *m, struct laters *l)
{
	struct cmd_ent *c = cmd_find(gw, m->id);
	struct later x = { .kind = L_COMMAND };

	if (c) {
		/* the same id again: run once, answer with where it is */
		q_push(gw, c->last_ack, strlen(c->last_ack));
		return;
	}
	cmd_ent_set(gw, m->id, ack_msg(m->id, "received", -1, NULL, NULL));
	c = cmd_find(gw, m->id);
	cmd_persist(gw, c->last_ack);
	q_push(gw, c->last_ack, strlen(c->last_ack));
	x.s1 = gw_xstrdup(m->id);
	x.s2 = gw_xstrdup(m->device);
	x.s3 = gw_xstrdup(m->name);
	x.s4 = m->params ? json_dumps(m->params, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
	if (!x.s4)
		x.s4 = gw_xstrdup("null");
	x.c.attempt = m->attempt;
	x.c.expires_at = m->expires_at;
	later_add(l, &x);
}

static void run_laters(struct iothub_gw *gw, struct laters *l)
{
	for (size_t i = 0; i < l->n; i++) {
		struct later *x = &l->v[i];

		switch (x->kind) {
		case L_REJECT:
			x->r.detail_json = x->s1;
			x->r.device = x->s2;
			x->r.code = x->s3;
			x->r.reading_json = x->s4;
			if (gw->on_reject)
				gw->on_reject(gw, &x->r, gw->user);
			break;
		case L_COMMAND: {
			struct handler *h = NULL;

			x->c.id = x->s1;
			x->c.device = x->s2;
			x->c.name = x->s3;
			x->c.params_json = x->s4;
			for (size_t k = 0; k < gw->nh; k++)
				if (gw->h[k].name && !strcmp(gw->h[k].name, x->s3))
					h = &gw->h[k];
			for (size_t k = 0; k < gw->nh && !h; k++)
				if (!gw->h[k].name)
					h = &gw->h[k];
			if (h)
				h->cb(gw, &x->c, h->user);
			else
				iothub_gw_cmd_rejected(gw, x->s1, "unsupported command");
			break;
		}
		case L_CANCEL:
			if (gw->on_cancel)
				gw->on_cancel(gw, x->s1, x->s2, gw->cancel_user);
			break;
		}
		free(x->s1);
		free(x->s2);
		free(x->s3);
		free(x->s4);
		free(x->s5);
	}
	free(l->v);
	memset(l, 0, sizeof(*l));
}

static void on_message(struct iothub_gw *gw, const char *buf, size_t len)
{
	struct laters l = { 0 };
	struct gwm m;
	int went_online = 0;

	if (gwm_parse(&m, buf, len, NULL, 0))
		return;   /* not ours to answer: the hub sent something odd */
	pthread_mutex_lock(&gw->mu);
	switch (m.type) {
	case GWM_ACK:
		on_ack(gw, &m, &l);
		break;
	case GWM_ANNOUNCED: {
		size_t i;
		json_t *e;

		if (gw->announce_wait > 0 && --gw->announce_wait)
			gw->announce_sent_at = now_mono();   /* the next one's clock */
		json_array_foreach(m.rejected, i, e) {
			json_t *code = json_object_get(e, "code"), *dv = json_object_get(e, "device");

			if (json_is_string(code) && !strcmp(json_string_value(code), "rate_limited") &&
			    json_is_string(dv)) {
				json_t *ra = json_object_get(e, "retry_after_ms");

				for (size_t k = 0; k < gw->ndevs; k++)
					if (!strcmp(gw->devs[k].id, json_string_value(dv)))
						gw->devs[k].announced = 0;
				gw->devs_new = 1;
				gw->announce_retry_at = now_mono() +
					(json_is_integer(ra) ? json_integer_value(ra) : 1000);
				continue;
			}
			reject_later(&l, 0, e, NULL);
		}
		if (!gw->announce_wait && !gw->online && !gw->devs_new) {
			gw->online = 1;
			went_online = 1;
		}
		break;
	}
	case GWM_ERROR:
		if (m.has_seq) {
			on_frame_error(gw, &m, &l);
		} else if (m.id) {
			struct cmd_ent *c = cmd_find(gw, m.id);

			if (!strcmp(m.code, "rate_limited") && c) {
				q_push(gw, c->last_ack, strlen(c->last_ack));
				gw->q_not_before = now_mono() +
					(m.retry_after_ms >= 0 ? m.retry_after_ms : 1000);
			}
			/* unknown_command, bad_message: dropped */
		} else if (!strcmp(m.code, "unavailable") && gw->announce_wait > 0) {
			/* the answer to an announce: all of it again, later */
			if (--gw->announce_wait)
				gw->announce_sent_at = now_mono();
			for (size_t k = 0; k < gw->ndevs; k++)
				gw->devs[k].announced = 0;
			gw->devs_new = gw->ndevs > 0;
			gw->announce_retry_at = now_mono() +
				(m.retry_after_ms >= 0 ? m.retry_after_ms : 1000);
		}
		break;
	case GWM_COMMAND:
		on_command(gw, &m, &l);
		break;
	case GWM_CANCEL: {
		struct later x = { .kind = L_CANCEL };

		x.s1 = gw_xstrdup(m.id);
		x.s2 = gw_xstrdup(m.device ? m.device : "");
		later_add(&l, &x);
		break;
	}
	default:
		break;
	}
	pthread_mutex_unlock(&gw->mu);
	gwm_free(&m);
	if (went_online) {
		gw->backoff_n = 0;
		state(gw, IOTHUB_GW_ONLINE, 0, NULL);
	}
	run_laters(gw, &l);
	pump(gw);
}

/* ------------------------------------------------------------------------ */
/* the lws callback                                                           */

static int callback(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
		    size_t len)
{
	struct iothub_gw *gw;

	if (!wsi)
		return 0;
	gw = lws_context_user(lws_get_context(wsi));
	if (!gw)
		return 0;
	switch (reason) {
	case LWS_CALLBACK_EVENT_WAIT_CANCELLED:
		if (gw && gw->started && !gw->destroying)
			pump(gw);
		return 0;
	case LWS_CALLBACK_CLIENT_APPEND_HANDSHAKE_HEADER: {
		unsigned char **p = in, *end = *p + len;

		if (lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_AUTHORIZATION,
						 (unsigned char *)gw->auth, (int)strlen(gw->auth),
						 p, end))
			return -1;
		return 0;
	}
	case LWS_CALLBACK_ESTABLISHED_CLIENT_HTTP:
		gw->http_status = lws_http_client_http_response(wsi);
		return 0;
	case LWS_CALLBACK_OPENSSL_PERFORM_SERVER_CERT_VERIFICATION:
		/* user: the X509_STORE_CTX, len: OpenSSL's verdict; 0 keeps it */
		if (!len && !gw->conn_error[0])
			snprintf(gw->conn_error, sizeof(gw->conn_error),
				 "TLS: the hub's certificate does not verify: %s",
				 X509_verify_cert_error_string(X509_STORE_CTX_get_error(user)));
		return 0;
	case LWS_CALLBACK_CLIENT_CONNECTION_ERROR:
		if (gw && !gw->conn_error[0])
			snprintf(gw->conn_error, sizeof(gw->conn_error), "%s",
				 in && len ? (const char *)in : "connection failed");
		return 0;
	case LWS_CALLBACK_CLIENT_ESTABLISHED:
		gw->wsi = wsi;
		gw->opened = 1;
		pthread_mutex_lock(&gw->mu);
		for (size_t i = 0; i < gw->ndevs; i++)
			gw->devs[i].announced = 0;
		gw->devs_new = gw->ndevs > 0;
		if (!gw->ndevs)
			gw->online = 1;
		pthread_mutex_unlock(&gw->mu);
		if (gw->online) {
			gw->backoff_n = 0;
			state(gw, IOTHUB_GW_ONLINE, 0, NULL);
		}
		pump(gw);
		return 0;
	case LWS_CALLBACK_CLIENT_RECEIVE:
		/* always 0: see the top of the file */
		if (gw->closing)
			return 0;
		if (lws_frame_is_binary(wsi))
			gw->rx_drop = 1;
		if (!gw->rx_drop && gw->rx.len + len <= RX_MAX)
			gbuf_add(&gw->rx, in, len);
		else
			gw->rx_drop = 1;
		if (lws_is_final_fragment(wsi)) {
			if (!gw->rx_drop)
				on_message(gw, gw->rx.data ? gw->rx.data : "", gw->rx.len);
			gw->rx.len = 0;
			gw->rx_drop = 0;
		}
		return 0;
	case LWS_CALLBACK_CLIENT_WRITEABLE:
		gw->want_write = 0;
		return on_writeable(gw);
	case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
		if (len >= 2) {
			const unsigned char *b = in;

			gw->close_code = (b[0] << 8) | b[1];
			snprintf(gw->close_reason, sizeof(gw->close_reason), "%.*s",
				 (int)(len - 2 > 120 ? 120 : len - 2), (const char *)in + 2);
		}
		return 0;
	case LWS_CALLBACK_WSI_DESTROY:
		if (lws_get_opaque_user_data(wsi) == gw && (gw->wsi == wsi ||
		    gw->wsi == (struct lws *)1)) {
			if (!gw->conn_error[0] && gw->http_status && gw->http_status != 101)
				snprintf(gw->conn_error, sizeof(gw->conn_error),
					 "the upgrade was refused with HTTP %d", gw->http_status);
			else if (!gw->conn_error[0] && !gw->close_code)
				snprintf(gw->conn_error, sizeof(gw->conn_error), "connection lost");
			conn_gone(gw);
		}
		return 0;
	default:
		return 0;
	}
}

/* ------------------------------------------------------------------------ */
/* timers                                                                     */

static void tick_cb(lws_sorted_usec_list_t *sul)
{
	struct iothub_gw *gw = lws_container_of(sul, struct iothub_gw, sul_tick);

	if (gw->destroying)
		return;
	if (!gw->wsi && gw->reconnect_at && now_mono() >= gw->reconnect_at && !gw->stopped)
		connect_now(gw);
	pump(gw);
}

static void wake_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
}

/* The next thing due: schedules the tick for it. */
static void schedule(struct iothub_gw *gw)
{
	int64_t now = now_mono(), next = now + 1000;

	if (gw->destroying)
		return;
	pthread_mutex_lock(&gw->mu);
	if (!gw->wsi && gw->reconnect_at && gw->reconnect_at < next)
		next = gw->reconnect_at;
	if (gw->batch_since && gw->batch_since + gw->max_delay_ms < next)
		next = gw->batch_since + gw->max_delay_ms;
	if (gw->opened) {
		if (gw->pause_until > now && gw->pause_until < next)
			next = gw->pause_until;
		if (gw->devs_new && gw->announce_retry_at > now && gw->announce_retry_at < next)
			next = gw->announce_retry_at;
		if (gw->q && gw->q_not_before > now && gw->q_not_before < next)
			next = gw->q_not_before;
		if (!gw->closing) {
			uint64_t seq;
			int64_t due = answer_due(gw, &seq);

			if (due && due < next)
				next = due;
		}
	}
	if (gw->fsync == IOTHUB_GW_FSYNC_BATCH && gw->ob.dirty && gw->fsync_at < next)
		next = gw->fsync_at;
	pthread_mutex_unlock(&gw->mu);
	gw->tick_at = next;
	lws_sul_schedule(gw->lws, 0, &gw->sul_tick, tick_cb,
			 next > now ? (lws_usec_t)(next - now) * 1000 : 1);
}

/* ------------------------------------------------------------------------ */
/* the API                                                                    */

struct iothub_gw *iothub_gw_new(const struct iothub_gw_opts *o, char *err, size_t errlen)
{
	struct lws_context_creation_info info;
	struct iothub_gw *gw;
	const char *files[] = { o->ca_file, o->cert_file, o->key_file };
	size_t max_spool;
	int rc;

	if (!o->spool_dir) {
		set_err(err, errlen, "spool_dir is required");
		return NULL;
	}
	if (!o->token && !o->token_cb) {
		set_err(err, errlen, "a token or a token_cb is required");
		return NULL;
	}
	if ((o->cert_file == NULL) != (o->key_file == NULL)) {
		set_err(err, errlen, "cert_file and key_file go together");
		return NULL;
	}
	for (size_t i = 0; i < 3; i++)
		if (files[i] && access(files[i], R_OK)) {
			set_err(err, errlen, "%.200s: %s", files[i], strerror(errno));
			return NULL;
		}
	gw = gw_xcalloc(1, sizeof(*gw));
	gw->ob.fd = gw->ob.dirfd = gw->cmd_fd = -1;   /* iothub_gw_free() may close them */
	gw->epfd = gw->wakefd = gw->sockfd = -1;
	pthread_mutex_init(&gw->mu, NULL);
	/* iothub_gw_fd(): lws's poll backend keeps its descriptors to itself
	 * (this lws has no external-poll callbacks), so epfd holds the ones
	 * the library knows: the connection's socket (sync_fd()) and wakefd,
	 * written by wake() next to lws_cancel_service() */
	gw->epfd = epoll_create1(EPOLL_CLOEXEC);
	gw->wakefd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (gw->epfd < 0 || gw->wakefd < 0 ||
	    epoll_ctl(gw->epfd, EPOLL_CTL_ADD, gw->wakefd,
		      &(struct epoll_event){ .events = EPOLLIN, .data.fd = gw->wakefd })) {
		set_err(err, errlen, "epoll/eventfd: %s", strerror(errno));
		iothub_gw_free(gw);
		return NULL;
	}
	if (parse_url(gw, o->url, err, errlen)) {
		iothub_gw_free(gw);
		return NULL;
	}
	if (o->token)
		snprintf(gw->token, sizeof(gw->token), "%s", o->token);
	gw->token_cb = o->token_cb;
	gw->token_user = o->token_user;
	gw->insecure = o->tls_insecure;
	gw->on_reject = o->on_reject;
	gw->sign_cb = o->sign_cb;
	gw->sign_user = o->sign_user;
	gw->on_state = o->on_state;
	gw->user = o->user;
	gw->max_readings = o->max_readings > 0 ? (size_t)o->max_readings : 500;
	if (gw->max_readings > 1000)
		gw->max_readings = 1000;
	gw->max_delay_ms = o->max_delay_ms > 0 ? o->max_delay_ms : 50;
	gw->max_frame_bytes = o->max_frame_bytes ? o->max_frame_bytes : 60000;
	gw->max_inflight = o->max_inflight > 0 ? o->max_inflight : 16;
	gw->ack_timeout_ms = o->ack_timeout_ms < 0 ? -1 :
			     o->ack_timeout_ms > 0 ? o->ack_timeout_ms : 10000;
	gw->fsync = o->fsync;
	gw->fsync_ms = o->fsync_ms > 0 ? o->fsync_ms : 200;
	gw->bo_min = o->backoff_min_ms > 0 ? o->backoff_min_ms : 500;
	gw->bo_max = o->backoff_max_ms > 0 ? o->backoff_max_ms : 30000;
	if (gw->bo_max < gw->bo_min)
		gw->bo_max = gw->bo_min;
	gw->rng = (uint64_t)gw_now_ms() ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)gw;
	if (!gw->rng)
		gw->rng = 88172645463325252ull;
	max_spool = o->max_spool_bytes ? o->max_spool_bytes : (64u << 20);
	rc = ob_open(&gw->ob, o->spool_dir, max_spool,
		     o->segment_bytes ? o->segment_bytes :
		     (max_spool / 16 > (64u << 10) ? max_spool / 16 : (64u << 10)),
		     o->fsync, err, errlen);
	if (rc) {
		iothub_gw_free(gw);
		return NULL;
	}
	cmd_load(gw);
	gw->protocols[0] = (struct lws_protocols){ "iothub-gw", callback, 0, 4096, 0, NULL, 0 };
	memset(&info, 0, sizeof(info));
	info.port = CONTEXT_PORT_NO_LISTEN;
	info.protocols = gw->protocols;
	info.options = gw->tls ? LWS_SERVER_OPTION_DO_SSL_GLOBAL_INIT : 0;
	info.gid = -1;
	info.uid = -1;
	info.timeout_secs = 10;
	info.user = gw;
	info.client_ssl_ca_filepath = o->ca_file;
	info.client_ssl_cert_filepath = o->cert_file;
	info.client_ssl_private_key_filepath = o->key_file;
	gw->lws = lws_create_context(&info);
	if (!gw->lws) {
		set_err(err, errlen, "cannot create the lws context (a bad CA or certificate file?)");
		iothub_gw_free(gw);
		return NULL;
	}
	return gw;
}

void iothub_gw_free(struct iothub_gw *gw)
{
	if (!gw)
		return;
	gw->destroying = 1;
	if (gw->lws) {
		lws_sul_cancel(&gw->sul_tick);
		lws_sul_cancel(&gw->sul_wake);
		lws_context_destroy(gw->lws);
	}
	ob_close(&gw->ob);
	if (gw->cmd_fd >= 0)
		close(gw->cmd_fd);
	if (gw->epfd >= 0)
		close(gw->epfd);
	if (gw->wakefd >= 0)
		close(gw->wakefd);
	for (size_t i = 0; i < gw->ndevs; i++) {
		free(gw->devs[i].id);
		free(gw->devs[i].type);
		free(gw->devs[i].labels);
	}
	free(gw->devs);
	for (size_t i = 0; i < CMD_RING; i++)
		free(gw->ring[i].last_ack);
	while (gw->q) {
		struct out_msg *m = gw->q;

		gw->q = m->next;
		free(m);
	}
	for (size_t i = 0; i < gw->nh; i++)
		free(gw->h[i].name);
	free(gw->h);
	gbuf_free(&gw->rx);
	gbuf_free(&gw->tx);
	free(gw->host);
	free(gw->path);
	free(gw->host_hdr);
	pthread_mutex_destroy(&gw->mu);
	free(gw);
}

static void wake(struct iothub_gw *gw)
{
	uint64_t one = 1;

	if (gw->lws)
		lws_cancel_service(gw->lws);
	if (gw->wakefd >= 0 && write(gw->wakefd, &one, sizeof(one)) < 0) {
		/* EAGAIN: the counter is full, so the fd is readable anyway */
	}
}

int iothub_gw_announce(struct iothub_gw *gw, const char *device, const char *device_type,
		       const char *labels_json, char *err, size_t errlen)
{
	char *labels = NULL;
	struct dev *d = NULL;

	if (!gw_valid_id(device) || !gw_valid_id(device_type)) {
		set_err(err, errlen, "device and device_type must match [A-Za-z0-9._:-]{1,128}");
		return IOTHUB_GW_EINVAL;
	}
	if (labels_json) {
		json_error_t je;
		json_t *l = json_loads(labels_json, JSON_REJECT_DUPLICATES, &je), *v;
		const char *k;

		if (!json_is_object(l)) {
			json_decref(l);
			set_err(err, errlen, "labels: not a JSON object");
			return IOTHUB_GW_EINVAL;
		}
		json_object_foreach(l, k, v)
			if (!json_is_string(v)) {
				json_decref(l);
				set_err(err, errlen, "labels: %.64s is not a string", k);
				return IOTHUB_GW_EINVAL;
			}
		labels = json_dumps(l, JSON_COMPACT);
		json_decref(l);
	}
	pthread_mutex_lock(&gw->mu);
	for (size_t i = 0; i < gw->ndevs; i++)
		if (!strcmp(gw->devs[i].id, device))
			d = &gw->devs[i];
	if (!d) {
		gw->devs = gw_xrealloc(gw->devs, (gw->ndevs + 1) * sizeof(*gw->devs));
		d = &gw->devs[gw->ndevs++];
		memset(d, 0, sizeof(*d));
		d->id = gw_xstrdup(device);
	}
	free(d->type);
	free(d->labels);
	d->type = gw_xstrdup(device_type);
	d->labels = labels;
	d->announced = 0;
	gw->devs_new = 1;
	pthread_mutex_unlock(&gw->mu);
	wake(gw);
	return IOTHUB_GW_OK;
}

static void put_lp(unsigned char *out, size_t cap, size_t *at, const void *p, size_t n)
{
	unsigned char l[4] = { (unsigned char)(n >> 24), (unsigned char)(n >> 16),
			       (unsigned char)(n >> 8), (unsigned char)n };

	for (int i = 0; i < 4; i++, (*at)++)
		if (*at < cap)
			out[*at] = l[i];
	if (*at + n <= cap && n)
		memcpy(out + *at, p, n);
	*at += n;
}

size_t iothub_gw_reading_message(const char *device, int64_t ts, const char *data,
				 size_t data_len, unsigned char *out, size_t cap)
{
	static const char dom[] = "iot-hub.reading.v1";
	char t[24];
	int tl = snprintf(t, sizeof(t), "%" PRId64, ts);
	size_t at = sizeof(dom);

	if (cap >= sizeof(dom))
		memcpy(out, dom, sizeof(dom));     /* with its NUL */
	put_lp(out, cap, &at, device, strlen(device));
	put_lp(out, cap, &at, t, (size_t)tl);
	put_lp(out, cap, &at, data, data_len);
	return at;
}

/* data_json without whitespace between tokens (what the hub stores). */
static void compact_json(struct gbuf *b, const char *s)
{
	int in = 0, esc = 0;

	for (; *s; s++) {
		if (in) {
			gbuf_add(b, s, 1);
			if (esc)
				esc = 0;
			else if (*s == '\\')
				esc = 1;
			else if (*s == '"')
				in = 0;
		} else if (*s != ' ' && *s != '\t' && *s != '\n' && *s != '\r') {
			gbuf_add(b, s, 1);
			in = *s == '"';
		}
	}
}

/* Appends ,"sig":"<hex>" for a signed reading. 0 or IOTHUB_GW_EINVAL. */
static int sign_reading(struct iothub_gw *gw, struct gbuf *b, const char *device, int64_t ts,
			const char *data, size_t dl, char *err, size_t errlen)
{
	unsigned char sig[64], *msg;
	size_t ml = iothub_gw_reading_message(device, ts, data, dl, NULL, 0);
	int rc;

	msg = malloc(ml);
	if (!msg) {
		set_err(err, errlen, "out of memory");
		return IOTHUB_GW_EINVAL;
	}
	iothub_gw_reading_message(device, ts, data, dl, msg, ml);
	rc = gw->sign_cb(gw, device, msg, ml, sig, gw->sign_user);
	free(msg);
	if (rc) {
		set_err(err, errlen, "the signing hook refused the reading");
		return IOTHUB_GW_EINVAL;
	}
	gbuf_puts(b, ",\"sig\":\"");
	for (int i = 0; i < 64; i++)
		gbuf_printf(b, "%02x", sig[i]);
	gbuf_puts(b, "\"");
	return 0;
}

int iothub_gw_send(struct iothub_gw *gw, const char *device, int64_t ts, const char *data_json,
		   char *err, size_t errlen)
{
	struct gbuf b = { 0 };
	json_error_t je;
	json_t *d;
	int rc, do_wake = 0;

	if (atomic_load(&gw->stopped)) {
		set_err(err, errlen, "the gateway was stopped");
		return IOTHUB_GW_ESTOPPED;
	}
	if (!gw_valid_id(device)) {
		set_err(err, errlen, "device must match [A-Za-z0-9._:-]{1,128}");
		return IOTHUB_GW_EINVAL;
	}
	if (!data_json) {
		set_err(err, errlen, "no data");
		return IOTHUB_GW_EINVAL;
	}
	/* checked as the hub will (an object, no repeated key), sent as written */
	d = json_loads(data_json, JSON_REJECT_DUPLICATES, &je);
	if (!json_is_object(d)) {
		json_decref(d);
		set_err(err, errlen, "data: %s", d ? "not a JSON object" : je.text);
		return IOTHUB_GW_EINVAL;
	}
	json_decref(d);
	if (gw->sign_cb && ts < 0) {
		struct timespec now;
		clock_gettime(CLOCK_REALTIME, &now);
		ts = (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
	}
	gbuf_printf(&b, "{\"device\":\"%s\",", device);
	if (ts >= 0)
		gbuf_printf(&b, "\"ts\":%" PRId64 ",", ts);
	gbuf_puts(&b, "\"data\":");
	if (gw->sign_cb) {
		size_t at = b.len;
		compact_json(&b, data_json);
		char *data = strndup(b.data + at, b.len - at);
		rc = data ? sign_reading(gw, &b, device, ts, data, strlen(data), err, errlen)
			  : IOTHUB_GW_EINVAL;
		free(data);
		if (rc) {
			gbuf_free(&b);
			return rc;
		}
	} else {
		for (const char *p = data_json; *p; p++)
			gbuf_add(&b, *p == '\n' || *p == '\r' ? " " : p, 1);   /* whitespace only */
	}
	gbuf_puts(&b, "}");
	if (b.len + 64 > gw->max_frame_bytes) {
		set_err(err, errlen, "reading of %zu bytes: a frame holds %zu", b.len,
			gw->max_frame_bytes);
		gbuf_free(&b);
		return IOTHUB_GW_ETOOBIG;
	}
	pthread_mutex_lock(&gw->mu);
	rc = ob_append(&gw->ob, b.data, b.len, 1, err, errlen);
	if (!rc) {
		size_t n = ob_unframed(&gw->ob, NULL);

		gw->st_accepted++;
		/* wake the loop when its timer must start or a frame is full */
		if ((n == 1 || n >= gw->max_readings) && !gw->wake_pending) {
			gw->wake_pending = 1;
			do_wake = 1;
		}
	}
	pthread_mutex_unlock(&gw->mu);
	gbuf_free(&b);
	if (do_wake)
		wake(gw);
	return rc;
}

void iothub_gw_on_command(struct iothub_gw *gw, const char *name, iothub_gw_command_cb cb,
			  void *user)
{
	gw->h = gw_xrealloc(gw->h, (gw->nh + 1) * sizeof(*gw->h));
	gw->h[gw->nh++] = (struct handler){ name ? gw_xstrdup(name) : NULL, cb, user };
}

void iothub_gw_on_cancel(struct iothub_gw *gw, iothub_gw_cancel_cb cb, void *user)
{
	gw->on_cancel = cb;
	gw->cancel_user = user;
}

int iothub_gw_cmd_report(struct iothub_gw *gw, const char *id, const char *status, int progress,
			 const char *message, const char *result_json, char *err, size_t errlen)
{
	static const char *const ok[] = { "received", "in_progress", "succeeded", "failed",
					  "rejected" };
	json_t *result = NULL;
	struct cmd_ent *c;
	size_t i;

	for (i = 0; i < 5 && status && strcmp(status, ok[i]); i++)
		;
	if (!id || i == 5) {
		set_err(err, errlen, "status must be received, in_progress, succeeded, failed "
			"or rejected");
		return IOTHUB_GW_EINVAL;
	}
	if (result_json) {
		json_error_t je;

		result = json_loads(result_json, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &je);
		if (!result) {
			set_err(err, errlen, "result: %s", je.text);
			return IOTHUB_GW_EINVAL;
		}
	}
	if (message && strlen(message) > 1024) {
		json_decref(result);
		set_err(err, errlen, "message over 1024 bytes");
		return IOTHUB_GW_EINVAL;
	}
	pthread_mutex_lock(&gw->mu);
	c = cmd_find(gw, id);
	if (!c) {
		pthread_mutex_unlock(&gw->mu);
		json_decref(result);
		set_err(err, errlen, "no command %.64s", id);
		return IOTHUB_GW_ENOENT;
	}
	free(c->last_ack);
	c->last_ack = ack_msg(id, status, progress, message, result);
	cmd_persist(gw, c->last_ack);
	q_push(gw, c->last_ack, strlen(c->last_ack));
	pthread_mutex_unlock(&gw->mu);
	json_decref(result);
	wake(gw);
	return IOTHUB_GW_OK;
}

int iothub_gw_cmd_in_progress(struct iothub_gw *gw, const char *id, int progress,
			      const char *message)
{
	return iothub_gw_cmd_report(gw, id, "in_progress", progress, message, NULL, NULL, 0);
}

int iothub_gw_cmd_succeeded(struct iothub_gw *gw, const char *id, const char *result_json)
{
	return iothub_gw_cmd_report(gw, id, "succeeded", -1, NULL, result_json, NULL, 0);
}

int iothub_gw_cmd_failed(struct iothub_gw *gw, const char *id, const char *error)
{
	return iothub_gw_cmd_report(gw, id, "failed", -1, error, NULL, NULL, 0);
}

int iothub_gw_cmd_rejected(struct iothub_gw *gw, const char *id, const char *error)
{
	return iothub_gw_cmd_report(gw, id, "rejected", -1, error, NULL, NULL, 0);
}

/* Keeps the connection's socket in epfd, edge-triggered for input and
 * output: lws's poll() wants POLLOUT only at times (connecting, a
 * WRITEABLE asked for, a send buffer full) that this side does not see,
 * and a level-triggered EPOLLOUT would keep an idle writable socket
 * "ready" for ever. An edge comes when the connect completes, data
 * arrives or a full send buffer drains; a WRITEABLE the library asked for
 * on a socket already writable is iothub_gw_next_timeout()'s 0. ADD fails
 * with EEXIST for a live registration (which it leaves alone: a MOD would
 * re-arm the edge); a closed socket left epfd by itself. */
static void sync_fd(struct iothub_gw *gw)
{
	int fd = gw->wsi && gw->wsi != (struct lws *)1 ? lws_get_socket_fd(gw->wsi) : -1;
	struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET };

	if (fd != gw->sockfd && gw->sockfd >= 0)
		epoll_ctl(gw->epfd, EPOLL_CTL_DEL, gw->sockfd, NULL);
	gw->sockfd = fd;
	if (fd < 0)
		return;
	ev.data.fd = fd;
	epoll_ctl(gw->epfd, EPOLL_CTL_ADD, fd, &ev);
}

int iothub_gw_service(struct iothub_gw *gw, int timeout_ms)
{
	struct epoll_event evs[4];

	uint64_t n;

	if (atomic_load(&gw->stopped))
		return IOTHUB_GW_ESTOPPED;
	/* take the edges now: what happens from here on makes epfd ready
	 * again; the wake is lws's too (lws_cancel_service): lws_service() runs
	 * it */
	while (epoll_wait(gw->epfd, evs, 4, 0) == 4)
		;
	if (read(gw->wakefd, &n, sizeof(n)) < 0) {
		/* EAGAIN: no wake pending */
	}
	if (!gw->started) {
		gw->started = 1;
		connect_now(gw);
		pump(gw);
	}
	if (timeout_ms > 0)
		lws_sul_schedule(gw->lws, 0, &gw->sul_wake, wake_cb,
				 (lws_usec_t)timeout_ms * 1000);
	lws_service(gw->lws, timeout_ms > 0 ? 0 : -1);
	lws_sul_cancel(&gw->sul_wake);
	sync_fd(gw);
	return atomic_load(&gw->stopped) ? IOTHUB_GW_ESTOPPED : IOTHUB_GW_OK;
}

int iothub_gw_fd(struct iothub_gw *gw, short *events)
{
	if (events)
		*events = POLLIN;
	return gw->epfd;
}

int iothub_gw_next_timeout(struct iothub_gw *gw)
{
	int64_t d;

	if (!gw->started)
		return 0;   /* the first service call connects */
	if (gw->want_write && gw->sockfd >= 0) {
		struct pollfd p = { .fd = gw->sockfd, .events = POLLOUT };

		if (poll(&p, 1, 0) == 1)
			return 0;   /* no edge will say so: it is writable already */
	}
	d = gw->tick_at - now_mono();
	if (d < 0)
		d = 0;
	/* lws's own timers (connect and close timeouts, PINGs) are not ours to
	 * see: they count in seconds, so waking once a second runs them */
	if (d > 1000)
		d = 1000;
	/* 0 when lws holds data it must process without a poll event */
	return lws_service_adjust_timeout(gw->lws, (int)d, 0);
}

void iothub_gw_run(struct iothub_gw *gw)
{
	while (iothub_gw_service(gw, 1000) == IOTHUB_GW_OK)
		;
}

void iothub_gw_stop(struct iothub_gw *gw)
{
	atomic_store(&gw->stopped, 1);
	wake(gw);
}

int iothub_gw_flush(struct iothub_gw *gw, int timeout_ms)
{
	int64_t end = now_mono() + timeout_ms;

	for (;;) {
		size_t n;

		pthread_mutex_lock(&gw->mu);
		n = ob_pending(&gw->ob);
		pthread_mutex_unlock(&gw->mu);
		if (!n)
			return 0;
		if (now_mono() >= end)
			return -1;
		if (iothub_gw_service(gw, 50) != IOTHUB_GW_OK)
			return -1;
	}
}

void iothub_gw_stats(struct iothub_gw *gw, struct iothub_gw_stats *s)
{
	pthread_mutex_lock(&gw->mu);
	s->accepted = gw->st_accepted;
	s->acked = gw->st_acked;
	s->duplicates = gw->st_dups;
	s->rejected = gw->st_rejected;
	s->rate_limited = gw->st_rl;
	s->unavailable = gw->st_unavail;
	s->frames_sent = gw->st_frames;
	s->reconnects = gw->st_reconnects;
	s->pending = ob_pending(&gw->ob);
	s->spool_bytes = gw->ob.total_bytes;
	s->next_seq = gw->ob.next_seq;
	s->online = gw->online;
	s->ack_timeouts = gw->st_ack_timeouts;
	s->frames_acked = gw->st_frames_acked;
	pthread_mutex_unlock(&gw->mu);
}
