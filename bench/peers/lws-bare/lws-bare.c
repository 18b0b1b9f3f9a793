/*
 * lws-bare: the "limit" baseline of the peer benchmarks (issue 5).
 *
 * One process, one lws 4.1.6 context on the libev backend (as the hub), no TLS,
 * no Redis. It speaks the subset of the gateway protocol that the benchmark
 * generator (tools/gw-sim) uses, with the hub's own codec and schema validator
 * (the hubpure library):
 *
 *   /v1/gateway, subprotocol iot-gateway.v1, any (or no) Authorization:
 *     announce  -> announced (unknown device types rejected as the hub does)
 *     telemetry -> every reading parsed (gw_reading_parse), checked as announced
 *                  on this connection, clock skew checked, validated against its
 *                  device type (schema_validate), then an ack in arrival order
 *                  with accepted / rejected exactly in the hub's format
 *     bad JSON / bad message -> error bad_json / bad_message
 *
 * What it does not do (on purpose: this is the ceiling without the store): no
 * JWT, no Redis, no rate limits, no registry, no commands (command_ack is
 * ignored), no aggregates.
 *
 * --broadcast adds the fan-out baseline: /v1/stream, subprotocol
 * iot-dashboard.v1; any subscribe is answered `subscribed`, a first-message
 * auth `authenticated`; every accepted reading is appended once to a shared
 * ring and every subscribed connection is made writeable
 * (lws_callback_on_writable_all_protocol, coalesced to one call per loop turn
 * through lws_cancel_service); each connection writes the ring's messages in
 * order as {"type":"reading","sub":<its id>,"device","ts","data","pos"}. A
 * connection that falls a whole ring behind gets {"type":"gap","sub","dropped"}
 * and continues at the oldest message still held.
 *
 * The listener is the hub's: our own socket (SO_REUSEPORT, backlog 4096),
 * adopted as a raw fd; accepted sockets get TCP_NODELAY and are adopted into
 * the vhost. --listen HOST:0 picks a free port and prints it
 * ("listening on HOST:PORT" on stderr, as the hub).
 */
#define _GNU_SOURCE
#include <libwebsockets.h>

#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "hub/strmap.h"
#include "hub/util.h"
#include "protocols/admit.h"
#include "protocols/gw_codec.h"
#include "protocols/schema.h"

#define MAX_FRAME_BYTES      65536   /* hub default max-frame-bytes */
#define MAX_READINGS         1000    /* hub default max-readings-per-frame */
#define MAX_DEVICES          100000  /* per announce (bench runs set the hub's high too) */
#define SKEW_FUTURE_MS       (300ll * 1000)         /* hub defaults */
#define SKEW_PAST_MS         (604800ll * 1000)
#define OUT_PAUSE            48      /* queued replies: stop reading the socket */
#define OUT_RESUME           16
#define RING_DEFAULT         16384   /* readings held for subscribers */
#define ACCEPTS_PER_WAKE     64

/* ---- outgoing messages ----------------------------------------------------- */

struct out_msg {
	struct out_msg *next;
	hub_buf b;                     /* LWS_PRE headroom + message */
};

struct out_q {
	struct out_msg *head, *tail;
	unsigned n;
};

static struct out_msg *msg_new(void)
{
	struct out_msg *m = hub_xcalloc(1, sizeof(*m));

	hub_buf_reserve(&m->b, LWS_PRE + 128);
	memset(m->b.data, 0, LWS_PRE);
	m->b.len = LWS_PRE;
	return m;
}

static void q_push(struct out_q *q, struct out_msg *m)
{
	if (q->tail)
		q->tail->next = m;
	else
		q->head = m;
	q->tail = m;
	q->n++;
}

static void q_pop_free(struct out_q *q)
{
	struct out_msg *m = q->head;

	q->head = m->next;
	if (!q->head)
		q->tail = NULL;
	q->n--;
	hub_buf_free(&m->b);
	free(m);
}

static void q_clear(struct out_q *q)
{
	while (q->head)
		q_pop_free(q);
}

/* ---- global state ---------------------------------------------------------- */

struct ring_slot {
	hub_buf body;                  /* ,"device":…,"ts":…,"data":{…},"pos":"…"} */
};

static struct {
	const char *listen;
	char host[64];
	int port;
	const char *schemas_dir;
	bool broadcast;
	bool quiet;
	size_t ring_n;

	schema_set *schemas;
	struct lws_context *ctx;
	struct lws_vhost *vh;
	int lfd;

	struct ring_slot *ring;
	uint64_t ring_head;            /* seq of the next reading appended */
	int64_t pos_ms;                /* pos = "<ms>-<k>" of the last frame */
	uint64_t pos_k;
	bool bc_pending;               /* a writable_all is owed to subscribers */

	hub_buf tx;                    /* stream writes: LWS_PRE + message */
	uint64_t frames, readings_ok, readings_rej, deliveries;
} G;

static volatile sig_atomic_t stop_flag;
static int stopped;
static lws_sorted_usec_list_t sul_stop;

/* With an event-lib backend lws_service() runs the loop until the context is
 * destroyed: from a sul (inside the service) lws defers the destroy until the
 * loop unwinds, then main() finishes it. */
static void stop_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	stopped = 1;
	lws_context_destroy(G.ctx);
}

/* ---- gateway connections ----------------------------------------------------- */

struct gw_conn {
	hub_strmap devices;            /* device id -> const schema_type * */
	hub_buf rx;
	struct out_q q;
	bool paused, discarding;
};

struct st_conn {
	struct out_q q;                /* control replies first */
	char *sub_json;                /* the subscription id as a JSON string */
	bool subscribed;
	uint64_t next;                 /* ring seq of the next reading to write */
};

struct pss {
	void *conn;
};

enum { P_HTTP, P_GW, P_STREAM, P_LISTEN };
static struct lws_protocols protocols[5];

static void gw_flow(struct lws *wsi, struct gw_conn *c)
{
	if (!c->paused && c->q.n >= OUT_PAUSE) {
		c->paused = true;
		lws_rx_flow_control(wsi, 0);
	} else if (c->paused && c->q.n <= OUT_RESUME) {
		c->paused = false;
		lws_rx_flow_control(wsi, 1);
	}
}

static void gw_send(struct lws *wsi, struct gw_conn *c, struct out_msg *m)
{
	q_push(&c->q, m);
	if (c->q.n == 1)
		lws_callback_on_writable(wsi);
	gw_flow(wsi, c);
}

/* One accepted reading into the shared ring (the part after "sub"). */
static void ring_append(const gw_reading *rd, int64_t ts)
{
	hub_buf *b = &G.ring[G.ring_head % G.ring_n].body;

	b->len = 0;
	hub_buf_puts(b, ",\"device\":");
	hub_buf_json_str(b, rd->device, rd->device_len);
	hub_buf_puts(b, ",\"ts\":");
	hub_buf_i64(b, ts);
	hub_buf_puts(b, ",\"data\":");
	hub_buf_reserve(b, 512);
	size_t room = b->cap - b->len;
	size_t need = json_dumpb(rd->data, b->data + b->len, room, JSON_COMPACT);
	if (need > room) {
		hub_buf_reserve(b, need);
		need = json_dumpb(rd->data, b->data + b->len, need, JSON_COMPACT);
	}
	b->len += need;
	hub_buf_puts(b, ",\"pos\":\"");
	hub_buf_i64(b, G.pos_ms);
	hub_buf_puts(b, "-");
	hub_buf_i64(b, (int64_t)G.pos_k);
	hub_buf_puts(b, "\"}");
	G.ring_head++;
}

/* A device is known when announced on this connection, with its type. */
static void admit_lookup(void *ctx, const char *device, size_t len, struct admit_device *out)
{
	struct gw_conn *c = ctx;
	const schema_type *t = hub_strmap_get(&c->devices, device, len);

	if (!t)
		return;
	out->announced = true;
	out->type = t;
	out->type_name = schema_type_name(t);
}

static void handle_telemetry(struct lws *wsi, struct gw_conn *c, gw_msg *msg)
{
	size_t n = json_array_size(msg->items), nacc = 0;
	int64_t now_ms = hub_now_ms();
	struct out_msg *m = msg_new();
	hub_buf rej = { 0 };

	if (G.broadcast) {
		if (now_ms == G.pos_ms) {
			G.pos_k++;
		} else {
			G.pos_ms = now_ms;
			G.pos_k = 0;
		}
	}
	struct admit_rules rules = {
		now_ms, SKEW_PAST_MS, SKEW_FUTURE_MS, NULL, admit_lookup, c,
	};
	for (size_t i = 0; i < n; i++) {
		struct admit_device ad;
		gw_reading rd;

		/* The hub's checks, without its rate limits and registry. */
		if (admit_reading(&rules, json_array_get(msg->items, i), i, &rd, &ad, &rej) !=
		    HUB_REJ_NONE)
			continue;
		nacc++;
		if (G.broadcast)
			ring_append(&rd, rd.has_ts ? rd.ts : now_ms);
	}
	G.frames++;
	G.readings_ok += nacc;
	G.readings_rej += n - nacc;
	hub_buf_puts(&m->b, "{\"type\":\"ack\",\"seq\":");
	hub_buf_i64(&m->b, msg->seq);
	hub_buf_puts(&m->b, ",\"accepted\":");
	hub_buf_i64(&m->b, (int64_t)nacc);
	hub_buf_puts(&m->b, ",\"rejected\":[");
	if (rej.len)
		hub_buf_append(&m->b, rej.data, rej.len);
	hub_buf_puts(&m->b, "]}");
	hub_buf_free(&rej);
	gw_send(wsi, c, m);

	if (nacc && G.broadcast && !G.bc_pending) {
		/* one writable_all per loop turn, however many frames came in it */
		G.bc_pending = true;
		lws_cancel_service(G.ctx);
	}
}

static void handle_announce(struct lws *wsi, struct gw_conn *c, gw_msg *msg)
{
	size_t n = json_array_size(msg->items);
	hub_buf acc = { 0 }, rej = { 0 };
	struct out_msg *m = msg_new();

	for (size_t i = 0; i < n; i++) {
		gw_announce a;
		char why[128];
		const schema_type *t;

		if (gw_announce_parse(json_array_get(msg->items, i), &a, why, sizeof(why))) {
			gw_write_announce_reject(&rej, &a, "invalid", why);
			continue;
		}
		t = schema_set_find(G.schemas, a.device_type, a.type_len);
		if (!t) {
			gw_write_announce_reject(&rej, &a, "unknown_device_type",
					"no such device type is loaded");
			continue;
		}
		hub_strmap_put(&c->devices, a.device, a.device_len, (void *)t);
		if (acc.len)
			hub_buf_puts(&acc, ",");
		hub_buf_json_str(&acc, a.device, a.device_len);
	}
	hub_buf_puts(&m->b, "{\"type\":\"announced\",\"accepted\":[");
	if (acc.len)
		hub_buf_append(&m->b, acc.data, acc.len);
	hub_buf_puts(&m->b, "],\"rejected\":[");
	if (rej.len)
		hub_buf_append(&m->b, rej.data, rej.len);
	hub_buf_puts(&m->b, "]}");
	hub_buf_free(&acc);
	hub_buf_free(&rej);
	gw_send(wsi, c, m);
}

static void gw_message(struct lws *wsi, struct gw_conn *c, const char *buf, size_t len)
{
	char why[160];
	gw_msg msg;
	enum gw_parse_result rc = gw_msg_parse(buf, len, MAX_READINGS, MAX_DEVICES, &msg, why,
					       sizeof(why));

	if (rc != GW_OK) {
		struct out_msg *m = msg_new();

		gw_write_error(&m->b, rc == GW_BAD_JSON ? "bad_json" : "bad_message",
			       rc == GW_BAD_MESSAGE && msg.has_seq ? msg.seq : -1, -1, why);
		gw_send(wsi, c, m);
	} else if (msg.type == GW_MSG_TELEMETRY) {
		handle_telemetry(wsi, c, &msg);
	} else if (msg.type == GW_MSG_ANNOUNCE) {
		handle_announce(wsi, c, &msg);
	}
	gw_msg_clear(&msg);
}

/* Reassembles fragments into a capped buffer (lws has no max message size). */
static int gw_receive(struct lws *wsi, struct gw_conn *c, const char *in, size_t len)
{
	bool final = lws_is_final_fragment(wsi) && !lws_remaining_packet_payload(wsi);

	if (c->discarding) {
		if (final) {
			lws_close_reason(wsi, LWS_CLOSE_STATUS_MESSAGE_TOO_LARGE,
					 (unsigned char *)"message too large", 17);
			return -1;
		}
		return 0;
	}
	if (!c->rx.len && final) {
		if (len > MAX_FRAME_BYTES) {
			lws_close_reason(wsi, LWS_CLOSE_STATUS_MESSAGE_TOO_LARGE,
					 (unsigned char *)"message too large", 17);
			return -1;
		}
		gw_message(wsi, c, in, len);
		return 0;
	}
	if (c->rx.len + len > MAX_FRAME_BYTES) {
		c->rx.len = 0;
		c->discarding = true;
		return 0;
	}
	hub_buf_append(&c->rx, in, len);
	if (final) {
		gw_message(wsi, c, c->rx.data, c->rx.len);
		c->rx.len = 0;
		if (c->rx.cap > 16 * 1024)
			hub_buf_free(&c->rx);
	}
	return 0;
}

static int gw_writeable(struct lws *wsi, struct gw_conn *c)
{
	struct out_msg *m = c->q.head;
	size_t n;

	if (!m)
		return 0;
	n = m->b.len - LWS_PRE;
	if (lws_write(wsi, (unsigned char *)m->b.data + LWS_PRE, n, LWS_WRITE_TEXT) < (int)n)
		return -1;
	q_pop_free(&c->q);
	if (c->q.head)
		lws_callback_on_writable(wsi);
	gw_flow(wsi, c);
	return 0;
}

static bool path_is(struct lws *wsi, const char *want)
{
	char uri[64];

	if (lws_hdr_copy(wsi, uri, sizeof(uri), WSI_TOKEN_GET_URI) < 0)
		return false;
	return !strcmp(uri, want);
}

static int gw_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user,
		       void *in, size_t len)
{
	struct pss *pss = user;
	struct gw_conn *c = pss ? pss->conn : NULL;

	switch (reason) {
	case LWS_CALLBACK_ESTABLISHED:
		if (!path_is(wsi, "/v1/gateway"))
			return -1;
		pss->conn = hub_xcalloc(1, sizeof(struct gw_conn));
		break;
	case LWS_CALLBACK_RECEIVE:
		return c ? gw_receive(wsi, c, in, len) : -1;
	case LWS_CALLBACK_SERVER_WRITEABLE:
		return c ? gw_writeable(wsi, c) : 0;
	case LWS_CALLBACK_CLOSED:
		if (c) {
			hub_strmap_free(&c->devices);
			hub_buf_free(&c->rx);
			q_clear(&c->q);
			free(c);
			pss->conn = NULL;
		}
		break;
	default:
		break;
	}
	return 0;
}

/* ---- dashboard stream (--broadcast) ------------------------------------------ */

static void st_reply(struct lws *wsi, struct st_conn *c, struct out_msg *m)
{
	q_push(&c->q, m);
	lws_callback_on_writable(wsi);
}

static void st_message(struct lws *wsi, struct st_conn *c, const char *buf, size_t len)
{
	json_t *root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, NULL);
	const char *type = json_string_value(json_object_get(root, "type"));
	struct out_msg *m;

	if (type && !strcmp(type, "subscribe")) {
		json_t *id = json_object_get(root, "id");
		char *idj = json_dumps(id ? id : json_null(), JSON_ENCODE_ANY | JSON_COMPACT);

		free(c->sub_json);
		c->sub_json = idj ? idj : hub_xstrdup("null");
		c->subscribed = true;
		c->next = G.ring_head;        /* live from now */
		m = msg_new();
		hub_buf_puts(&m->b, "{\"type\":\"subscribed\",\"id\":");
		hub_buf_puts(&m->b, c->sub_json);
		hub_buf_puts(&m->b, ",\"position\":\"");
		hub_buf_i64(&m->b, hub_now_ms());
		hub_buf_puts(&m->b, "-0\"}");
		st_reply(wsi, c, m);
	} else if (type && !strcmp(type, "auth")) {
		m = msg_new();
		hub_buf_puts(&m->b, "{\"type\":\"authenticated\",\"name\":\"bare\"}");
		st_reply(wsi, c, m);
	} else if (type && !strcmp(type, "unsubscribe")) {
		c->subscribed = false;
		m = msg_new();
		hub_buf_puts(&m->b, "{\"type\":\"unsubscribed\",\"id\":");
		hub_buf_puts(&m->b, c->sub_json ? c->sub_json : "null");
		hub_buf_puts(&m->b, "}");
		st_reply(wsi, c, m);
	}
	json_decref(root);
}

static int st_writeable(struct lws *wsi, struct st_conn *c)
{
	const char *pre = "{\"type\":\"reading\",\"sub\":";
	size_t n;

	if (c->q.head) {
		struct out_msg *m = c->q.head;

		n = m->b.len - LWS_PRE;
		if (lws_write(wsi, (unsigned char *)m->b.data + LWS_PRE, n, LWS_WRITE_TEXT) < (int)n)
			return -1;
		q_pop_free(&c->q);
		goto more;
	}
	if (!c->subscribed || c->next >= G.ring_head)
		return 0;
	G.tx.len = LWS_PRE;
	if (G.ring_head - c->next > G.ring_n) {
		uint64_t dropped = G.ring_head - G.ring_n - c->next;

		c->next = G.ring_head - G.ring_n;
		hub_buf_puts(&G.tx, "{\"type\":\"gap\",\"sub\":");
		hub_buf_puts(&G.tx, c->sub_json);
		hub_buf_puts(&G.tx, ",\"dropped\":");
		hub_buf_i64(&G.tx, (int64_t)dropped);
		hub_buf_puts(&G.tx, "}");
	} else {
		const hub_buf *body = &G.ring[c->next % G.ring_n].body;

		hub_buf_puts(&G.tx, pre);
		hub_buf_puts(&G.tx, c->sub_json);
		hub_buf_append(&G.tx, body->data, body->len);
		c->next++;
		G.deliveries++;
	}
	n = G.tx.len - LWS_PRE;
	if (lws_write(wsi, (unsigned char *)G.tx.data + LWS_PRE, n, LWS_WRITE_TEXT) < (int)n)
		return -1;
more:
	if (c->q.head || (c->subscribed && c->next < G.ring_head))
		lws_callback_on_writable(wsi);
	return 0;
}

static int st_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user,
		       void *in, size_t len)
{
	struct pss *pss = user;
	struct st_conn *c = pss ? pss->conn : NULL;

	switch (reason) {
	case LWS_CALLBACK_ESTABLISHED:
		if (!G.broadcast || !path_is(wsi, "/v1/stream"))
			return -1;
		pss->conn = hub_xcalloc(1, sizeof(struct st_conn));
		break;
	case LWS_CALLBACK_RECEIVE:
		/* dashboard messages are small: a fragment is dropped, not reassembled */
		if (c && lws_is_first_fragment(wsi) && lws_is_final_fragment(wsi))
			st_message(wsi, c, in, len);
		break;
	case LWS_CALLBACK_SERVER_WRITEABLE:
		return c ? st_writeable(wsi, c) : 0;
	case LWS_CALLBACK_CLOSED:
		if (c) {
			q_clear(&c->q);
			free(c->sub_json);
			free(c);
			pss->conn = NULL;
		}
		break;
	default:
		break;
	}
	return 0;
}

/* ---- http (upgrades only), listener, signals ------------------------------------ */

static int http_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user,
			 void *in, size_t len)
{
	switch (reason) {
	case LWS_CALLBACK_EVENT_WAIT_CANCELLED:
		if (stop_flag && !stopped)
			lws_sul_schedule(G.ctx, 0, &sul_stop, stop_cb, 0);
		if (G.bc_pending) {
			G.bc_pending = false;
			lws_callback_on_writable_all_protocol(G.ctx, &protocols[P_STREAM]);
		}
		return 0;
	case LWS_CALLBACK_HTTP:
		/* no HTTP routes: plain requests get 404 */
		lws_return_http_status(wsi, HTTP_STATUS_NOT_FOUND, NULL);
		return -1;
	default:
		break;
	}
	return lws_callback_http_dummy(wsi, reason, user, in, len);
}

static int listen_callback(struct lws *wsi, enum lws_callback_reasons reason, void *user,
			   void *in, size_t len)
{
	switch (reason) {
	case LWS_CALLBACK_FILTER_PROTOCOL_CONNECTION:
	case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
		return 1;  /* internal protocol: never an upgrade target */
	case LWS_CALLBACK_RAW_RX_FILE:
		for (int i = 0; i < ACCEPTS_PER_WAKE; i++) {
			int one = 1, fd = accept4(lws_get_socket_fd(wsi), NULL, NULL,
						  SOCK_NONBLOCK | SOCK_CLOEXEC);
			if (fd < 0)
				break;
			setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
			lws_adopt_socket_vhost(G.vh, fd);  /* closes fd on failure */
		}
		return 0;
	default:
		return 0;
	}
}

static int open_listener(void)
{
	struct sockaddr_storage ss;
	socklen_t sl;
	const char *colon = strrchr(G.listen, ':');
	int one = 1, fd;
	size_t hl;

	if (!colon || colon == G.listen)
		return -1;
	hl = (size_t)(colon - G.listen);
	if (G.listen[0] == '[' && colon[-1] == ']') {
		hl -= 2;
		if (hl >= sizeof(G.host))
			return -1;
		memcpy(G.host, G.listen + 1, hl);
	} else {
		if (hl >= sizeof(G.host))
			return -1;
		memcpy(G.host, G.listen, hl);
	}
	G.host[hl] = '\0';
	G.port = atoi(colon + 1);
	memset(&ss, 0, sizeof(ss));
	if (strchr(G.host, ':')) {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;

		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons((uint16_t)G.port);
		if (inet_pton(AF_INET6, G.host, &s6->sin6_addr) != 1)
			return -1;
		sl = sizeof(*s6);
	} else {
		struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;

		s4->sin_family = AF_INET;
		s4->sin_port = htons((uint16_t)G.port);
		if (inet_pton(AF_INET, G.host, &s4->sin_addr) != 1)
			return -1;
		sl = sizeof(*s4);
	}
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&ss, sl) || listen(fd, 4096)) {
		close(fd);
		return -1;
	}
	sl = sizeof(ss);
	getsockname(fd, (struct sockaddr *)&ss, &sl);
	G.port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
						: ((struct sockaddr_in *)&ss)->sin_port);
	G.lfd = fd;
	return 0;
}

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
	if (G.ctx)
		lws_cancel_service(G.ctx);
}

static void usage(FILE *f)
{
	fprintf(f,
"usage: lws-bare [--listen HOST:PORT] [--schemas DIR] [--broadcast] [--ring N] [-q]\n"
"The bare-lws baseline of the peer benchmarks: /v1/gateway (iot-gateway.v1)\n"
"announce/telemetry with the hub's schema validation and acks, no Redis.\n"
"  --listen HOST:PORT  default 127.0.0.1:8080; port 0 picks one (printed as\n"
"                      'listening on HOST:PORT' on stderr)\n"
"  --schemas DIR       device types (default deploy/device-types)\n"
"  --broadcast         also serve /v1/stream (iot-dashboard.v1): every accepted\n"
"                      reading goes to every subscribed connection\n"
"  --ring N            readings held for slow subscribers (default %d)\n"
"  -q                  no stats line at exit\n", RING_DEFAULT);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "listen", required_argument, NULL, 'l' },
		{ "schemas", required_argument, NULL, 's' },
		{ "broadcast", no_argument, NULL, 'b' },
		{ "ring", required_argument, NULL, 'r' },
		{ "quiet", no_argument, NULL, 'q' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 }
	};
	struct lws_context_creation_info info;
	struct rlimit rl;
	char err[256];
	lws_sock_file_fd_type lfd;
	int o;

	G.listen = "127.0.0.1:8080";
	G.schemas_dir = "deploy/device-types";
	G.ring_n = RING_DEFAULT;
	while ((o = getopt_long(argc, argv, "qh", opts, NULL)) != -1) {
		switch (o) {
		case 'l': G.listen = optarg; break;
		case 's': G.schemas_dir = optarg; break;
		case 'b': G.broadcast = true; break;
		case 'r':
			G.ring_n = (size_t)strtoul(optarg, NULL, 10);
			if (G.ring_n < 16 || G.ring_n > (1u << 24)) {
				fprintf(stderr, "lws-bare: --ring: 16 to 16777216\n");
				return 2;
			}
			break;
		case 'q': G.quiet = true; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc) {
		usage(stderr);
		return 2;
	}
	G.schemas = schema_set_load_dir(G.schemas_dir, err, sizeof(err));
	if (!G.schemas) {
		fprintf(stderr, "lws-bare: %s\n", err);
		return 1;
	}
	if (open_listener()) {
		fprintf(stderr, "lws-bare: cannot listen on %s: %s\n", G.listen,
			errno ? strerror(errno) : "bad HOST:PORT");
		return 1;
	}
	if (G.broadcast) {
		G.ring = hub_xcalloc(G.ring_n, sizeof(*G.ring));
		hub_buf_reserve(&G.tx, LWS_PRE + 1024);
		memset(G.tx.data, 0, LWS_PRE);
	}
	/* lws sizes its fd table from the limit */
	if (!getrlimit(RLIMIT_NOFILE, &rl) && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	signal(SIGPIPE, SIG_IGN);
	lws_set_log_level(LLL_ERR | LLL_WARN, NULL);

	protocols[P_HTTP] = (struct lws_protocols){ "http", http_callback, 0, 0, 0, NULL, 0 };
	protocols[P_GW] = (struct lws_protocols){ "iot-gateway.v1", gw_callback,
						  sizeof(struct pss), 1024, 0, NULL, 0 };
	protocols[P_STREAM] = (struct lws_protocols){ "iot-dashboard.v1", st_callback,
						      sizeof(struct pss), 1024, 0, NULL, 0 };
	protocols[P_LISTEN] = (struct lws_protocols){ "lws-bare-listener", listen_callback,
						      0, 0, 0, NULL, 0 };

	memset(&info, 0, sizeof(info));
	info.options = LWS_SERVER_OPTION_EXPLICIT_VHOSTS | LWS_SERVER_OPTION_LIBEV |
		       LWS_SERVER_OPTION_UV_NO_SIGSEGV_SIGFPE_SPIN;
	info.pt_serv_buf_size = 32768;
	G.ctx = lws_create_context(&info);
	if (!G.ctx) {
		fprintf(stderr, "lws-bare: cannot create the lws context (libwebsockets-evlib-ev?)\n");
		return 1;
	}
	memset(&info, 0, sizeof(info));
	info.port = CONTEXT_PORT_NO_LISTEN_SERVER;
	info.protocols = protocols;
	info.vhost_name = "lws-bare";
	info.options = LWS_SERVER_OPTION_LIBEV;
	G.vh = lws_create_vhost(G.ctx, &info);
	lfd.filefd = dup(G.lfd);
	if (!G.vh || lfd.filefd < 0 ||
	    !lws_adopt_descriptor_vhost(G.vh, LWS_ADOPT_RAW_FILE_DESC, lfd,
					protocols[P_LISTEN].name, NULL)) {
		fprintf(stderr, "lws-bare: cannot set up the vhost/listener\n");
		lws_context_destroy(G.ctx);
		return 1;
	}
	/* after lws: its ev backend installs handlers of its own */
	{
		struct sigaction sa;

		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = on_signal;
		sigemptyset(&sa.sa_mask);
		sigaction(SIGINT, &sa, NULL);
		sigaction(SIGTERM, &sa, NULL);
		sigaction(SIGHUP, &sa, NULL);
	}
	fprintf(stderr, "listening on %s:%d\n", G.host, G.port);

	while (!stopped)
		if (lws_service(G.ctx, 0) < 0)
			break;
	lws_context_destroy(G.ctx);
	close(G.lfd);
	if (!G.quiet)
		fprintf(stderr, "lws-bare: frames %llu, readings accepted %llu, rejected %llu, "
			"deliveries %llu\n", (unsigned long long)G.frames,
			(unsigned long long)G.readings_ok, (unsigned long long)G.readings_rej,
			(unsigned long long)G.deliveries);
	for (size_t i = 0; G.ring && i < G.ring_n; i++)
		hub_buf_free(&G.ring[i].body);
	free(G.ring);
	hub_buf_free(&G.tx);
	schema_set_free(G.schemas);
	return 0;
}
