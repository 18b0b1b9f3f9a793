#include "protocols/gateway.h"

#include <stdlib.h>
#include <string.h>

#include "hub/http.h"
#include "hub/events.h"
#include "hub/hub.h"
#include "hub/ingest.h"
#include "hub/jarena.h"
#include "hub/keys.h"
#include "hub/provenance.h"
#include "hub/link.h"
#include "hub/log.h"
#include "hub/loop.h"
#include "hub/module.h"
#include "hub/ratelimit.h"
#include "hub/redis.h"
#include "hub/registry.h"
#include "hub/revoke.h"
#include "hub/util.h"
#include "protocols/admit.h"
#include "protocols/anomaly.h"
#include "protocols/gw_codec.h"
#include "protocols/schema.h"
#include "protocols/ws_rx.h"

#define RX_KEEP_BYTES    (16 * 1024)  /* reassembly buffer kept between frames */
#define QUEUE_SLACK      16           /* ready replies beyond in-flight frames */
#define CLOSE_TAKEOVER   4001
#define CLOSE_CONNECT_RATE 4029       /* reconnecting faster than gateway-connect-rate */
#define CLOSE_REVOKED    4401         /* its credentials were revoked */
#define DISCARD_FACTOR   16           /* bytes dropped before closing, x max-frame-bytes */
#define CLOSE_GRACE_S    5            /* to write the close, then cut off */
#define DATA_DUMP_RESERVE 512         /* room for one reading's data JSON */

struct gw_conn;

/* A device announced on this connection. */
struct gw_dev {
	const schema_type *type;   /* valid while type_gen == hub->schemas_gen */
	uint32_t type_gen;
	bool seen;                 /* readings since the last last_seen flush */
	bool lost;                 /* announced since by another connection */
	hub_bucket bucket;
	struct hub_slot agg_slot;  /* an observer's cache (the aggregates' partial) */
	char *labels;              /* compact JSON object, keys sorted */
	size_t labels_len;
	const char *type_name;     /* interned (type_name_intern): compared by pointer */
	char id[];
};

/* One message to the gateway, queued in order. `waiting` replies await Redis;
 * the writer only sends from the head, so replies leave in arrival order. */
struct gw_reply {
	struct gw_reply *next;
	struct gw_conn *conn;
	bool waiting;
	bool is_announce;
	bool holds;                /* the connection is not read until it is ready */
	struct hub_registry_call *regq; /* its announce, while it waits for room (registry.h) */
	char **announced;          /* accepted devices: their commands go out once registered */
	size_t nannounced;
	int64_t seq;
	int64_t t0_us;
	unsigned accepted;
	hub_buf rejected;          /* JSON array entries, comma separated */
	hub_buf out;               /* LWS_PRE headroom + message */
	hub_buf fields;            /* numeric fields, for the observers once stored */
};

struct gw_conn {
	struct hub_link link;      /* what other modules see (hub/link.h) */
	struct lws *wsi;           /* NULL once closed */
	struct hub *hub;
	uint64_t serial;
	char *gw;                  /* the token's sub: the gateway id */
	char *jti;                 /* the token's jti, or NULL (revocations) */
	auth_patterns allowed;     /* the token's `devices` claim */
	char *conn_id;             /* "<instance>:<run token>:<serial>" */
	hub_strmap devices;        /* device id -> struct gw_dev * */
	hub_bucket bucket;         /* readings */
	hub_bucket announce_bucket, ack_bucket;
	struct gw_conn *displaced; /* the local connection of the gateway this one
				    * replaces once its connect is allowed */
	struct hub_registry_call *connect_q, *rebuild_q; /* its connect, its
				    * re-announce, while they wait for room */
	struct ws_rx rx;           /* message reassembly, capped */
	const char **seen;         /* devices with readings since the last flush */
	size_t nseen, seen_cap;
	struct gw_conn *dnext, **dprev; /* in gws->dirty[slice] (dprev NULL: not) */
	struct gw_reply *head, *tail;
	unsigned queued, waiting;
	unsigned refs;             /* the wsi + replies awaiting Redis */
	unsigned holds;            /* not read while Redis has yet to answer: the
				    * connect (limits, epoch), an announce (the
				    * devices' limits) */
	bool paused, closing, draining;
	bool limits_dirty;         /* a bucket changed since its TATs were saved */
	int close_code;
	bool peer_closed;          /* the gateway sent a close frame */
	int64_t rx_us;             /* when it last sent anything (a pong too) */
	int64_t epoch;             /* takeover order (Redis INCR); 0 = not yet */
	int64_t beaten_by;         /* highest foreign epoch seen before ours */
	const char *close_reason;
	char *close_reason_owned;  /* a close reason made for this connection */
};

struct gw_pss {
	struct gw_conn *conn;
	struct hub_ka_entry ka;   /* liveness (hub/loop.h) */
};

struct stored_ref {
	const char *device;
	size_t device_len;
	struct gw_dev *dev;
	int64_t ts;
	size_t ts_off, ts_len, data_off, data_len;
	size_t sig_off, sig_len;   /* a signed type's signature (hex), in vals */
	size_t anom_off, anom_len;   /* `,"anomalies":[…]` in vals, or 0 long */
	bool grouped;
};

/* last_seen flushes: each connection once a second, the connections spread
 * over SEEN_SLICES ticks by serial, and the devices of a tick batched into
 * one script call per SEEN_BATCH. One EVALSHA per connection per second, all
 * in the same loop turn, queued a burst of ~1,000 commands ahead of the
 * frames every second (1,000 gateways): a 10-20 ms stall, most of the p99
 * frame->ack latency at half load. */
#define SEEN_SLICES 10
#define SEEN_BATCH  256

struct seen_ent {
	struct gw_conn *c;         /* a reference is held while in flight */
	struct gw_dev *d;          /* owned by c */
};

/* The module (hub->gw): every gateway connection of this process and what
 * they share. */
struct gateways {
	struct hub *hub;
	hub_strmap conns;          /* gateway id -> its current struct gw_conn * */
	/* device id -> the local connection that announced it last (commands
	 * are delivered to it). Entries go when their connection closes. */
	hub_strmap dev_conns;
	/* Device type names, one copy each for the life of the process (a
	 * handful, kept across schema reloads): a device holds a pointer, not
	 * a 129-byte array, and devices of one type share it. */
	hub_strmap type_names;
	uint64_t next_serial;      /* connection serials */

	/* Per-frame scratch of handle_telemetry, reused across frames (the
	 * store copies what it needs before returning). */
	struct {
		hub_buf vals, feed;
		struct stored_ref *refs;
		struct hub_store_reading *sr;
		struct hub_store_group *groups;
		gw_span *spans;
		size_t cap;
		struct hub_ev_reading *ev;   /* HUB_EV_READINGS_STORED */
		struct hub_ev_field *fields;
		size_t ev_cap, fields_cap;
	} scratch;

	/* The last_seen batch being filled. */
	struct {
		struct seen_ent e[SEEN_BATCH];
		struct hub_seen_item items[SEEN_BATCH];
		size_t n;
		int64_t now_ms, now_us;
		unsigned slice;
	} seen;
	/* Per slice, the connections with something to flush (devices seen,
	 * limits changed): a tick walks those, not every connection. */
	struct gw_conn *dirty[SEEN_SLICES];
	lws_sorted_usec_list_t sul_seen;

	/* The re-announce after Redis lost the registry. */
	struct {
		struct gw_conn **todo;     /* the connections to go, references held */
		size_t n, next;
		size_t inflight;           /* devices at Redis */
		bool failed;               /* a re-announce got no answer: do it again */
		lws_sorted_usec_list_t sul;
	} rb;
};

static const char *type_name_intern(struct gateways *gws, const char *name)
{
	size_t len = strlen(name);
	char *s = hub_strmap_get(&gws->type_names, name, len);

	if (!s) {
		s = hub_xstrdup(name);
		hub_strmap_put(&gws->type_names, name, len, s);
	}
	return s;
}

static const struct hub_link_ops link_ops;

/* The gauge of gateway connections follows the map. */
static void conns_changed(struct gateways *gws)
{
	gws->hub->metrics.gateway_connections = gws->conns.count;
}

/* dev_conns, with the gauge of online devices following it. */
static void dev_conn_put(struct gateways *gws, const char *id, size_t len, struct gw_conn *c)
{
	hub_strmap_put(&gws->dev_conns, id, len, c);
	gws->hub->metrics.devices_online = gws->dev_conns.count;
}

static void dev_conn_del(struct gateways *gws, const char *id, size_t len)
{
	hub_strmap_del(&gws->dev_conns, id, len);
	gws->hub->metrics.devices_online = gws->dev_conns.count;
}

/* ---- connection and reply lifetime --------------------------------------- */

static void free_dev(const char *key, void *value, void *arg)
{
	struct gw_dev *d = value;

	(void)key;
	(void)arg;
	hub_slot_drop(&d->agg_slot);
	free(d->labels);
	free(d);
}

/* c has something for the next last_seen flush of its slice. */
static void dirty_add(struct gw_conn *c)
{
	struct gw_conn **head;

	if (c->dprev)
		return;
	head = &c->hub->gw->dirty[c->serial % SEEN_SLICES];
	c->dnext = *head;
	if (*head)
		(*head)->dprev = &c->dnext;
	*head = c;
	c->dprev = head;
}

static void dirty_del(struct gw_conn *c)
{
	if (!c->dprev)
		return;
	*c->dprev = c->dnext;
	if (c->dnext)
		c->dnext->dprev = c->dprev;
	c->dnext = NULL;
	c->dprev = NULL;
}

static void limits_changed(struct gw_conn *c)
{
	c->limits_dirty = true;
	dirty_add(c);
}

static void conn_unref(struct gw_conn *c)
{
	if (--c->refs)
		return;
	dirty_del(c);
	hub_strmap_foreach(&c->devices, free_dev, NULL);
	hub_strmap_free(&c->devices);
	ws_rx_free(&c->rx);
	free(c->seen);
	free(c->conn_id);
	free(c->close_reason_owned);
	auth_patterns_free(&c->allowed);
	free(c->jti);
	free(c->gw);
	free(c);
}

static struct gw_reply *reply_new(struct gw_conn *c)
{
	struct gw_reply *r = hub_xcalloc(1, sizeof(*r));

	r->conn = c;
	r->t0_us = hub_mono_us();
	r->seq = -1;
	hub_buf_reserve(&r->out, LWS_PRE + 160);
	memset(r->out.data, 0, LWS_PRE);
	r->out.len = LWS_PRE;
	return r;
}

static void reply_free(struct gw_reply *r)
{
	hub_buf_free(&r->rejected);
	hub_buf_free(&r->out);
	hub_buf_free(&r->fields);
	for (size_t i = 0; i < r->nannounced; i++)
		free(r->announced[i]);
	free(r->announced);
	free(r);
}

/* The keepalive runs only while the hub reads the connection. One the hub
 * stopped reading (a connect or announce waiting in the registry, frames
 * waiting on Redis) may hold the gateway's PONG unread: hanging it up for
 * that blamed the gateway for the hub's wait, and in a reconnect storm
 * dropped every gateway still queued after ping-timeout-s, each of which
 * came back into the same queue. Reading again starts the clock afresh; a
 * peer can extend its life this way only by what it sent before. */
static void conn_keepalive(struct gw_conn *c, bool on)
{
	struct gw_pss *pss = lws_wsi_user(c->wsi);

	if (!pss || pss->conn != c)
		return;
	if (on)
		hub_keepalive_start(c->hub, &pss->ka, c->wsi);
	else
		hub_keepalive_stop(c->hub, &pss->ka);
}

static void conn_update_flow(struct gw_conn *c)
{
	struct hub_config *cfg = &c->hub->cfg;
	bool over = c->holds || c->waiting >= (unsigned)cfg->max_inflight_frames ||
		    c->queued >= (unsigned)cfg->max_inflight_frames + QUEUE_SLACK;

	if (!c->wsi || c->draining || c->closing)
		return;
	if (over && !c->paused) {
		c->paused = true;
		if (!c->holds)
			c->hub->metrics.flow_paused_total++;
		lws_rx_flow_control(c->wsi, 0);
		conn_keepalive(c, false);
	} else if (!over && c->paused) {
		c->paused = false;
		lws_rx_flow_control(c->wsi, 1);
		conn_keepalive(c, true);
	}
}

static void conn_close(struct gw_conn *c, int code, const char *reason);

/* Sends the ready replies at the head of the queue now, from whatever
 * callback made them ready (the frame's receive, the Redis reply), instead
 * of asking for a WRITEABLE callback: that costs two epoll_ctl calls and a
 * loop turn per ack. lws buffers what the socket does not take; while such
 * a partial send is pending, the WRITEABLE path takes over. Returns -1 when
 * the connection failed (lws closes it). */
/* Writes the ready reply at the head and takes it off the queue. */
static int write_head(struct gw_conn *c)
{
	struct gw_reply *r = c->head;
	size_t n = r->out.len - LWS_PRE;
	int w = lws_write(c->wsi, (unsigned char *)r->out.data + LWS_PRE, n, LWS_WRITE_TEXT);

	if (w > 0)
		c->hub->metrics.bytes_sent[HUB_WS_GATEWAY] += (uint64_t)w;
	c->head = r->next;
	if (!c->head)
		c->tail = NULL;
	c->queued--;
	reply_free(r);
	if (w < (int)n)
		return -1;
	conn_update_flow(c);
	return 0;
}

static int write_ready(struct gw_conn *c)
{
	while (c->head && !c->head->waiting && c->wsi && !c->closing) {
		if (lws_partial_buffered(c->wsi)) {
			lws_callback_on_writable(c->wsi);
			return 0;
		}
		if (write_head(c))
			return -1;
	}
	if (c->wsi && (c->closing || (c->head && !c->head->waiting) ||
		       (!c->head && c->draining)))
		lws_callback_on_writable(c->wsi);
	return 0;
}

static void enqueue(struct gw_conn *c, struct gw_reply *r)
{
	if (c->tail)
		c->tail->next = r;
	else
		c->head = r;
	c->tail = r;
	c->queued++;
	if (r->waiting) {
		c->waiting++;
		c->refs++;
	}
	conn_update_flow(c);
	if (!r->waiting && c->head == r && write_ready(c))
		conn_close(c, LWS_CLOSE_STATUS_ABNORMAL_CLOSE, "write failed");
}

/* A waiting reply got its answer: the writer may send it when it is at the
 * head. Returns false when the connection is gone (the reply was freed). */
static bool reply_ready(struct gw_reply *r)
{
	struct gw_conn *c = r->conn;

	r->waiting = false;
	c->waiting--;
	if (!c->wsi) {
		/* Closed meanwhile: nobody to tell. */
		reply_free(r);
		conn_unref(c);
		return false;
	}
	conn_unref(c);
	conn_update_flow(c);
	if (c->head == r && write_ready(c))
		conn_close(c, LWS_CLOSE_STATUS_ABNORMAL_CLOSE, "write failed");
	return true;
}

static void queue_error(struct gw_conn *c, const char *code, int64_t seq,
			int64_t retry_after_ms, const char *message)
{
	struct gw_reply *r = reply_new(c);

	gw_write_error(&r->out, code, seq, retry_after_ms, message);
	enqueue(c, r);
}

/* An error about a command_ack, naming its id (ids are at most
 * GW_ACK_ID_MAX bytes by now, or the reason says they were not). */
static void queue_ack_error(struct gw_conn *c, const char *code, const char *id,
			    int64_t retry_after_ms, const char *message)
{
	struct gw_reply *r = reply_new(c);

	hub_buf_printf(&r->out, "{\"type\":\"error\",\"code\":\"%s\",\"id\":", code);
	hub_buf_json_str(&r->out, id, strnlen(id, GW_ACK_ID_MAX));
	if (retry_after_ms > 0)
		hub_buf_printf(&r->out, ",\"retry_after_ms\":%lld", (long long)retry_after_ms);
	hub_buf_puts(&r->out, ",\"message\":");
	hub_buf_json_str(&r->out, message, strlen(message));
	hub_buf_puts(&r->out, "}");
	enqueue(c, r);
}

/* Closes with code once the ready replies are written. A peer that does not
 * read (the socket never becomes writeable) is cut off after CLOSE_GRACE_S
 * instead of holding the connection open until the ping timeout. */
static void conn_close(struct gw_conn *c, int code, const char *reason)
{
	if (!c->wsi || c->closing)
		return;
	c->closing = true;
	c->close_code = code;
	c->close_reason = reason;
	lws_set_timeout(c->wsi, PENDING_TIMEOUT_USER_OK, CLOSE_GRACE_S);
	lws_callback_on_writable(c->wsi);
}

/* ---- telemetry ----------------------------------------------------------- */

static void finish_ack(struct gw_reply *r, bool duplicate)
{
	struct hub *hub = r->conn->hub;

	hub_buf_puts(&r->out, "{\"type\":\"ack\",\"seq\":");
	hub_buf_i64(&r->out, r->seq);
	hub_buf_puts(&r->out, ",\"accepted\":");
	hub_buf_i64(&r->out, r->accepted);
	hub_buf_puts(&r->out, ",\"rejected\":[");
	if (r->rejected.len)
		hub_buf_append(&r->out, r->rejected.data, r->rejected.len);
	hub_buf_puts(&r->out, duplicate ? "],\"duplicate\":true}" : "]}");
	hub->metrics.acks_total++;
	hub->metrics.frames[duplicate ? HUB_FRAME_DUPLICATE : HUB_FRAME_ACKED]++;
	hub_hist_observe(&hub->metrics.ack_latency,
			 (double)(hub_mono_us() - r->t0_us) / 1e6);
}

/* ---- stored readings, for the observers ---------------------------------
 * The numeric fields of a frame's accepted readings are recorded in the
 * reply (r->fields) and handed to the HUB_EV_READINGS_STORED observers (the
 * aggregates) only once the frame is stored, so a resend is never counted
 * twice. Record per reading: gw_dev pointer, ts, field count, then per
 * field: name length (1 byte), name, value (double). The devices outlive the
 * reply (it holds a reference on the connection, which owns them). */

static void fields_record(hub_buf *b, struct gw_dev *d, int64_t ts, json_t *data)
{
	const char *k;
	json_t *v;
	size_t at, nf = 0;
	uint16_t n16;

	hub_buf_reserve(b, sizeof(d) + sizeof(ts) + sizeof(n16));
	memcpy(b->data + b->len, &d, sizeof(d));
	memcpy(b->data + b->len + sizeof(d), &ts, sizeof(ts));
	b->len += sizeof(d) + sizeof(ts);
	at = b->len;
	b->len += sizeof(n16);
	json_object_foreach(data, k, v) {
		size_t kl = strlen(k);
		double x;

		if (!json_is_number(v) || kl > 255 || nf == UINT16_MAX)
			continue;
		x = json_number_value(v);
		hub_buf_reserve(b, 1 + kl + sizeof(x));
		b->data[b->len++] = (char)kl;
		memcpy(b->data + b->len, k, kl);
		memcpy(b->data + b->len + kl, &x, sizeof(x));
		b->len += kl + sizeof(x);
		nf++;
	}
	n16 = (uint16_t)nf;
	memcpy(b->data + at, &n16, sizeof(n16));
}

/* Decodes the records of b into the scratch arrays and emits them. */
static void emit_stored(struct hub *hub, const hub_buf *b)
{
	struct gateways *gws = hub->gw;
	size_t off = 0, n = 0, nf = 0;

	while (off < b->len) {
		struct gw_dev *d;
		struct hub_ev_reading *r;
		uint16_t cnt;

		if (n == gws->scratch.ev_cap) {
			gws->scratch.ev_cap = gws->scratch.ev_cap ? 2 * gws->scratch.ev_cap : 64;
			gws->scratch.ev = hub_xrealloc(gws->scratch.ev, gws->scratch.ev_cap *
						       sizeof(*gws->scratch.ev));
		}
		r = &gws->scratch.ev[n++];
		memcpy(&d, b->data + off, sizeof(d));
		memcpy(&r->ts, b->data + off + sizeof(d), sizeof(r->ts));
		memcpy(&cnt, b->data + off + sizeof(d) + sizeof(r->ts), sizeof(cnt));
		off += sizeof(d) + sizeof(r->ts) + sizeof(cnt);
		r->device = d->id;
		r->type = d->type_name;
		r->labels = d->labels;
		r->labels_len = d->labels_len;
		r->slot = &d->agg_slot;
		r->nfields = cnt;
		r->fields = NULL;
		if (nf + cnt > gws->scratch.fields_cap) {
			gws->scratch.fields_cap = 2 * (nf + cnt) + 64;
			gws->scratch.fields = hub_xrealloc(gws->scratch.fields, gws->scratch.fields_cap *
							   sizeof(*gws->scratch.fields));
		}
		for (uint16_t i = 0; i < cnt; i++) {
			struct hub_ev_field *f = &gws->scratch.fields[nf + i];

			f->len = (unsigned char)b->data[off];
			f->name = b->data + off + 1;
			memcpy(&f->value, b->data + off + 1 + f->len, sizeof(f->value));
			off += 1 + f->len + sizeof(f->value);
		}
		/* Offsets now, pointers below: the fields array may still move. */
		r->fields = (const struct hub_ev_field *)(uintptr_t)nf;
		nf += cnt;
	}
	for (size_t i = 0; i < n; i++)
		gws->scratch.ev[i].fields = gws->scratch.fields + (uintptr_t)gws->scratch.ev[i].fields;
	if (n) {
		struct hub_ev_readings rs = { gws->scratch.ev, n };
		hub_emit(hub, HUB_EV_READINGS_STORED, &rs);
	}
}

static void on_stored(redisReply *reply, void *arg)
{
	struct gw_reply *r = arg;
	struct hub *hub = r->conn->hub;

	bool stored = reply && reply->type == REDIS_REPLY_ARRAY && reply->elements >= 1 &&
		      reply->element[0]->type == REDIS_REPLY_INTEGER;
	bool dup = stored && reply->element[0]->integer == 0;

	if (stored && !dup)
		emit_stored(hub, &r->fields); /* stored, even if the gateway left */
	if (r->conn->wsi) {
		if (stored) {
			if (!dup)
				hub->metrics.readings_accepted += r->accepted;
			finish_ack(r, dup);
		} else {
			if (reply && reply->type == REDIS_REPLY_ERROR)
				hub_err("gateway %s: store failed: %s", r->conn->gw, reply->str);
			hub->metrics.frames[HUB_FRAME_UNAVAILABLE]++;
			gw_write_error(&r->out, "unavailable", r->seq, hub->cfg.retry_after_ms,
				       "telemetry store unavailable; resend this frame later");
		}
	}
	reply_ready(r);
}

static const schema_type *dev_type(struct hub *hub, struct gw_dev *d)
{
	if (d->type_gen != hub->schemas_gen) {
		d->type = schema_set_find(hub->schemas, d->type_name, strlen(d->type_name));
		d->type_gen = hub->schemas_gen;
	}
	return d->type;
}

/* What admission needs to know of a reading's device (protocols/admit.h). */
static void admit_lookup(void *ctx, const char *device, size_t len, struct admit_device *out)
{
	struct gw_conn *c = ctx;
	struct gw_dev *d = hub_strmap_get(&c->devices, device, len);

	if (!d)
		return;
	out->announced = true;
	out->lost = d->lost;
	out->type = dev_type(c->hub, d);
	out->type_name = d->type_name;
	out->ref = d;
}

/* One line of the frame's feed entry and live message (docs/dashboard.md):
 * device TAB type TAB labels TAB "device":…,"ts":…,"data":{…} LF. */
static void feed_line(hub_buf *feed, const hub_buf *vals, const struct stored_ref *s)
{
	struct gw_dev *d = s->dev;
	size_t tl = strlen(d->type_name);

	hub_buf_reserve(feed, s->device_len * 2 + tl + d->labels_len + s->data_len + 64);
	hub_buf_append(feed, s->device, s->device_len);
	hub_buf_append(feed, "\t", 1);
	hub_buf_append(feed, d->type_name, tl);
	hub_buf_append(feed, "\t", 1);
	hub_buf_append(feed, d->labels, d->labels_len);
	hub_buf_puts(feed, "\t\"device\":\"");
	hub_buf_append(feed, s->device, s->device_len); /* [A-Za-z0-9._:-]: no escaping */
	hub_buf_puts(feed, "\",\"ts\":");
	hub_buf_append(feed, vals->data + s->ts_off, s->ts_len);
	hub_buf_puts(feed, ",\"data\":");
	hub_buf_append(feed, vals->data + s->data_off, s->data_len);
	hub_buf_append(feed, vals->data + s->anom_off, s->anom_len);
	hub_buf_append(feed, "\n", 1);
}

/* Writes the accepted readings' lines grouped by device type (stable within
 * a type); returns the number of groups. */
static size_t feed_build(hub_buf *feed, const hub_buf *vals, struct stored_ref *refs,
			 size_t n, struct hub_store_group *groups)
{
	size_t ng = 0;

	feed->len = 0;
	for (size_t i = 0; i < n; i++)
		refs[i].grouped = false;
	for (size_t i = 0; i < n; i++) {
		if (refs[i].grouped)
			continue;
		struct hub_store_group *g = &groups[ng++];
		g->type = refs[i].dev->type_name;
		g->off = feed->len;
		for (size_t j = i; j < n; j++) {
			if (refs[j].grouped || (j > i && refs[j].dev->type_name != g->type &&
						    strcmp(refs[j].dev->type_name, g->type)))
				continue;
			refs[j].grouped = true;
			feed_line(feed, vals, &refs[j]);
		}
		g->len = feed->len - g->off;
	}
	return ng;
}

#define SCRATCH_KEEP_BYTES (64 * 1024)  /* a bigger frame's buffers are freed */

/* The reading's device and its gateway each give a token, or the wait until
 * they can (ms). */
static int64_t take_tokens(struct gw_conn *c, struct gw_dev *d, int64_t now_us)
{
	const struct hub_config *cfg = &c->hub->cfg;
	int64_t wait_ms = hub_bucket_take(&d->bucket, cfg->device_rate, cfg->device_burst, 1,
					  now_us);

	if (!wait_ms) {
		wait_ms = hub_bucket_take(&c->bucket, cfg->gateway_rate, cfg->gateway_burst, 1,
					  now_us);
		if (wait_ms)
			d->bucket.tokens += 1; /* refund: the gateway bucket said no */
		limits_changed(c);
	}
	return wait_ms;
}

static void mark_seen(struct gw_conn *c, struct gw_dev *d)
{
	if (d->seen)
		return;
	d->seen = true;
	dirty_add(c);
	if (c->nseen == c->seen_cap) {
		c->seen_cap = c->seen_cap ? c->seen_cap * 2 : 8;
		c->seen = hub_xrealloc(c->seen, c->seen_cap * sizeof(*c->seen));
	}
	c->seen[c->nseen++] = d->id;
}

/* An accepted reading's ts and data, serialized once into vals (for the
 * device stream and the feed). Its data is stored as the gateway wrote it
 * (compacted) when the frame's text maps it (span), else serialized. */
static void serialize_reading(hub_buf *vals, struct stored_ref *s, const gw_reading *rd,
			      struct gw_dev *d, int64_t ts, const gw_msg *msg, const gw_span *span)
{
	s->device = rd->device;
	s->device_len = rd->device_len;
	s->dev = d;
	s->ts = ts;
	s->ts_off = vals->len;
	hub_buf_i64(vals, ts);
	s->ts_len = vals->len - s->ts_off;
	s->data_off = vals->len;
	if (span && span->len) {
		gw_append_compact(vals, msg->text + span->off, span->len);
	} else {
		/* Dump once into reserved space; only an object larger than
		 * that is dumped a second time (json_dumpb returns the size it
		 * needed, larger than the space means truncated). */
		hub_buf_reserve(vals, DATA_DUMP_RESERVE);
		size_t room = vals->cap - vals->len - 1;
		size_t need = json_dumpb(rd->data, vals->data + vals->len, room, JSON_COMPACT);
		if (need > room) {
			hub_buf_reserve(vals, need);
			need = json_dumpb(rd->data, vals->data + vals->len, need, JSON_COMPACT);
		}
		vals->len += need;
	}
	s->data_len = vals->len - s->data_off;
}

/* Sends the frame's accepted readings to Redis; the ack waits for it. */
static void store_accepted(struct gw_conn *c, struct gw_reply *r, const hub_buf *vals,
			   hub_buf *feed, size_t nacc)
{
	struct hub *hub = c->hub;
	struct gateways *gws = hub->gw;
	struct stored_ref *refs = gws->scratch.refs;
	struct hub_store_reading *sr = gws->scratch.sr;

	for (size_t i = 0; i < nacc; i++) {
		sr[i].device = refs[i].device;
		sr[i].ts = vals->data + refs[i].ts_off;
		sr[i].ts_len = refs[i].ts_len;
		sr[i].data = vals->data + refs[i].data_off;
		sr[i].data_len = refs[i].data_len;
		sr[i].sig = refs[i].sig_len ? vals->data + refs[i].sig_off : NULL;
		sr[i].sig_len = refs[i].sig_len;
		/* the array alone: `,"anomalies":` left out */
		sr[i].anom = refs[i].anom_len ? vals->data + refs[i].anom_off + ANOM_PREFIX_LEN : NULL;
		sr[i].anom_len = refs[i].anom_len ? refs[i].anom_len - ANOM_PREFIX_LEN : 0;
	}
	size_t ng = feed_build(feed, vals, refs, nacc, gws->scratch.groups);
	r->waiting = true;
	if (hub_store_frame(hub, c->gw, r->seq, sr, nacc, feed->data, feed->len,
			    gws->scratch.groups, ng, on_stored, r)) {
		r->waiting = false;
		hub->metrics.frames[HUB_FRAME_UNAVAILABLE]++;
		gw_write_error(&r->out, "unavailable", r->seq, hub->cfg.retry_after_ms,
			       "telemetry store unavailable; resend this frame later");
	}
}

static void scratch_reserve(struct gateways *gws, size_t n)
{
	if (n <= gws->scratch.cap)
		return;
	gws->scratch.cap = n;
	gws->scratch.refs = hub_xrealloc(gws->scratch.refs, n * sizeof(*gws->scratch.refs));
	gws->scratch.sr = hub_xrealloc(gws->scratch.sr, n * sizeof(*gws->scratch.sr));
	gws->scratch.groups = hub_xrealloc(gws->scratch.groups, n * sizeof(*gws->scratch.groups));
	gws->scratch.spans = hub_xrealloc(gws->scratch.spans, n * sizeof(*gws->scratch.spans));
}

#define SIG_PENDING_RETRY_MS 100

/* A reading of a type that requires signatures (docs/provenance.md): its
 * sig is checked over the ts and data as stored in vals, and kept in vals
 * for the store. True when it is refused (the entry is written and vals
 * rolled back) or must wait for the device's key (*pending). */
static bool signature_refused(struct gw_conn *c, struct gw_reply *r, hub_buf *vals,
			      struct stored_ref *s, const schema_type *type, json_t *item,
			      size_t i, const gw_reading *rd, bool *pending)
{
	json_t *sj;
	const char *why = "a signed reading needs its ts (the signature covers it)";
	enum hub_prov_sig v = HUB_PROV_SIG_BAD;

	s->sig_len = 0;
	if (!type || !hub_prov_type_signed(type))
		return false;
	sj = json_object_get(item, "sig");
	if (rd->has_ts)
		v = hub_prov_check_sig(c->hub, rd->device, rd->device_len, vals->data + s->ts_off,
				       s->ts_len, vals->data + s->data_off, s->data_len,
				       json_string_value(sj), json_string_length(sj), &why);
	if (v == HUB_PROV_SIG_OK) {
		s->sig_off = vals->len;
		hub_buf_append(vals, json_string_value(sj), json_string_length(sj));
		s->sig_len = json_string_length(sj);
		return false;
	}
	vals->len = s->ts_off;
	if (v == HUB_PROV_SIG_PENDING) {
		*pending = true;
		return true;
	}
	admit_reject(&r->rejected, i, rd, HUB_REJ_BAD_SIGNATURE, why);
	c->hub->metrics.readings_rejected[HUB_REJ_BAD_SIGNATURE]++;
	return true;
}

/* A telemetry frame: each reading admitted (protocols/admit.h) and rate
 * limited, the accepted ones stored in one script call; the ack (accepted
 * count and every refusal) goes once Redis has them. */
static void handle_telemetry(struct gw_conn *c, gw_msg *msg)
{
	struct hub *hub = c->hub;
	struct hub_config *cfg = &hub->cfg;
	struct gateways *gws = hub->gw;
	size_t n = json_array_size(msg->items), nacc = 0;
	int64_t now_ms = hub_now_ms(), now_us = hub_mono_us();
	struct gw_reply *r = reply_new(c);
	hub_buf vals = gws->scratch.vals, feed = gws->scratch.feed;
	struct admit_rules rules = {
		now_ms, (int64_t)cfg->clock_skew_past_s * 1000,
		(int64_t)cfg->clock_skew_future_s * 1000, &c->allowed, admit_lookup, c,
	};

	r->seq = msg->seq;
	if (!hub_ingest_up(hub, c->gw)) {
		hub->metrics.frames[HUB_FRAME_UNAVAILABLE]++;
		gw_write_error(&r->out, "unavailable", msg->seq, cfg->retry_after_ms,
			       "telemetry store unavailable; resend this frame later");
		enqueue(c, r);
		return;
	}
	/* Redis (or this hub's loop) is seconds behind: a frame queued now
	 * would be answered later still, past the gateway's ack timeout, and
	 * its reconnect would add to the load (a storm that collapses instead
	 * of finishing). Answered at once; the gateway resends it once that
	 * backlog may be gone (a retry sooner would only be shed again, and a
	 * fleet retrying every second spent the hubs' CPU on answering them). */
	int64_t behind_ms = cfg->redis_shed_ms ? hub_ingest_backlog_us(hub, c->gw, now_us) / 1000 : 0;
	if (cfg->redis_shed_ms && behind_ms > cfg->redis_shed_ms) {
		hub->metrics.frames[HUB_FRAME_SHED]++;
		gw_write_error(&r->out, "unavailable", msg->seq,
			       behind_ms > cfg->retry_after_ms ? (int)(behind_ms < 60000 ? behind_ms : 60000)
							       : cfg->retry_after_ms,
			       "telemetry store behind; resend this frame later");
		enqueue(c, r);
		return;
	}
	scratch_reserve(gws, n);
	vals.len = 0;
	bool raw = n && !gw_data_spans(msg, gws->scratch.spans, n), sig_pending = false;
	for (size_t i = 0; i < n; i++) {
		struct admit_device ad;
		gw_reading rd;
		enum hub_reject_code code = admit_reading(&rules, json_array_get(msg->items, i), i,
							  &rd, &ad, &r->rejected);
		struct gw_dev *d = ad.ref;
		int64_t wait_ms, ts;

		if (code != HUB_REJ_NONE) {
			hub->metrics.readings_rejected[code]++;
			continue;
		}
		if ((wait_ms = take_tokens(c, d, now_us))) {
			admit_reject_rate_limited(&r->rejected, i, &rd, wait_ms);
			hub->metrics.readings_rejected[HUB_REJ_RATE_LIMITED]++;
			continue;
		}
		mark_seen(c, d);
		ts = rd.has_ts ? rd.ts : now_ms;
		struct stored_ref *sref = &gws->scratch.refs[nacc++];
		serialize_reading(&vals, sref, &rd, d, ts, msg, raw ? &gws->scratch.spans[i] : NULL);
		if (signature_refused(c, r, &vals, sref, ad.type, json_array_get(msg->items, i), i,
				      &rd, &sig_pending)) {
			nacc--;
			continue;
		}
		sref->anom_off = vals.len;
		anom_check(hub, rd.device, rd.device_len, ad.type, ts, rd.data, &vals);
		sref->anom_len = vals.len - sref->anom_off;
		fields_record(&r->fields, d, ts, rd.data);
	}
	if (sig_pending) { /* a device key is being read: the whole frame later */
		hub->metrics.frames[HUB_FRAME_UNAVAILABLE]++;
		gw_write_error(&r->out, "unavailable", msg->seq, SIG_PENDING_RETRY_MS,
			       "a device's signing key is being loaded; resend this frame");
		enqueue(c, r);
		gws->scratch.vals = vals;
		gws->scratch.feed = feed;
		return;
	}
	r->accepted = (unsigned)nacc;
	if (nacc)
		store_accepted(c, r, &vals, &feed, nacc);
	else
		finish_ack(r, false); /* nothing to store: acked at once, in order */
	enqueue(c, r);
	if (vals.cap > SCRATCH_KEEP_BYTES)
		hub_buf_free(&vals);
	if (feed.cap > SCRATCH_KEEP_BYTES)
		hub_buf_free(&feed);
	gws->scratch.vals = vals;
	gws->scratch.feed = feed;
}

/* ---- announce ------------------------------------------------------------ */

static void on_announced(redisReply *reply, void *arg)
{
	struct gw_reply *r = arg;
	struct gw_conn *c = r->conn;
	struct hub *hub = c->hub;

	if (r->holds) {
		r->holds = false;
		c->holds--;
	}
	if (c->wsi) {
		if (reply && reply->type == REDIS_REPLY_ARRAY) {
			struct hub_config *cfg = &c->hub->cfg;
			int64_t now_us = hub_mono_us(), now_ms = hub_now_ms();

			hub_buf_append(&r->out, r->rejected.data, r->rejected.len);
			for (size_t i = 0; i < r->nannounced; i++) {
				const char *id = r->announced[i];
				struct gw_dev *d = hub_strmap_get(&c->devices, id, strlen(id));
				const redisReply *t = i < reply->elements ? reply->element[i] : NULL;

				/* The device's limit as its last holder left it. */
				if (d && t && t->type == REDIS_REPLY_STRING)
					hub_bucket_merge_tat(&d->bucket, strtoll(t->str, NULL, 10),
							     cfg->device_rate, cfg->device_burst,
							     now_us, now_ms);
				dev_conn_put(hub->gw, id, strlen(id), c);
			}
			/* After `announced` in the queue: what the observers send
			 * (the devices' pending commands). */
			struct hub_ev_announced ev = { &c->link, (const char *const *)r->announced,
						       r->nannounced };
			hub_emit(c->hub, HUB_EV_DEVICES_ANNOUNCED, &ev);
		} else {
			if (reply && reply->type == REDIS_REPLY_ERROR)
				hub_err("gateway %s: announce failed: %s", r->conn->gw, reply->str);
			gw_write_error(&r->out, "unavailable", -1, r->conn->hub->cfg.retry_after_ms,
				       "device registry unavailable; announce again later");
		}
	}
	reply_ready(r);
}

/* The checks of one announced device, in order: well formed, allowed by the
 * token's claim, a loaded type, room on the connection, the announce rate.
 * Returns its type, or NULL with its rejection appended to rej. */
static const schema_type *announce_check(struct gw_conn *c, const gw_announce *a, hub_buf *rej,
					 int64_t now_us)
{
	struct hub *hub = c->hub;
	const schema_type *t;
	int64_t wait_ms;

	if (!auth_patterns_match(&c->allowed, a->device)) {
		gw_write_announce_reject(rej, a, "unauthorized_device",
					 "device not allowed by the token's devices claim");
		return NULL;
	}
	t = schema_set_find(hub->schemas, a->device_type, a->type_len);
	if (!t) {
		gw_write_announce_reject(rej, a, "unknown_device_type", "no such device type is loaded");
		return NULL;
	}
	if (!hub_strmap_get(&c->devices, a->device, a->device_len) &&
	    c->devices.count >= (size_t)hub->cfg.max_devices_per_gateway) {
		gw_write_announce_reject(rej, a, "too_many_devices",
					 "this connection announced max-devices-per-gateway devices");
		return NULL;
	}
	/* Each device announced costs a token of the gateway's announce bucket
	 * (kept across reconnects): an announce loop cannot flood Redis or the
	 * dashboards' presence streams. */
	wait_ms = hub_bucket_take(&c->announce_bucket, hub->cfg.announce_rate,
				  hub->cfg.announce_burst, 1, now_us);
	limits_changed(c);
	if (wait_ms) {
		gw_write_announce_reject(rej, a, "rate_limited", "announcing faster than announce-rate");
		rej->len--; /* its closing brace */
		hub_buf_printf(rej, ",\"retry_after_ms\":%lld}", (long long)wait_ms);
		return NULL;
	}
	return t;
}

/* The connection's record of an accepted device (created on first
 * announce), updated with its type and labels (compact JSON, keys sorted). */
static struct gw_dev *announce_take(struct gw_conn *c, const gw_announce *a,
				    const schema_type *t, const char *labels)
{
	struct hub *hub = c->hub;
	struct gw_dev *d = hub_strmap_get(&c->devices, a->device, a->device_len);

	if (!d) {
		d = hub_xcalloc(1, sizeof(*d) + a->device_len + 1);
		memcpy(d->id, a->device, a->device_len);
		hub_bucket_init(&d->bucket, hub->cfg.device_burst, hub_mono_us());
		hub_strmap_put(&c->devices, a->device, a->device_len, d);
	}
	d->type_name = type_name_intern(hub->gw, schema_type_name(t));
	d->type = t;
	d->type_gen = hub->schemas_gen;
	d->lost = false; /* announced again: this connection takes it back */
	free(d->labels);
	d->labels = hub_xstrdup(labels);
	d->labels_len = strlen(labels);
	return d;
}

/* An announce: each device checked (announce_check), the accepted ones
 * registered in one script call; the `announced` reply goes once Redis has
 * them, and the connection is not read until then. */
static void handle_announce(struct gw_conn *c, gw_msg *msg)
{
	struct hub *hub = c->hub;
	size_t n = json_array_size(msg->items), nacc = 0;
	struct hub_announce_item *items = n ? hub_xmalloc(n * sizeof(*items)) : NULL;
	char **labels = n ? hub_xcalloc(n, sizeof(*labels)) : NULL;
	hub_buf acc = { 0 }, rej = { 0 };
	struct gw_reply *r = reply_new(c);
	int64_t now_us = hub_mono_us();

	hub->metrics.announces_total++;
	for (size_t i = 0; i < n; i++) {
		gw_announce a;
		char why[128];
		const schema_type *t;
		struct gw_dev *d;

		if (gw_announce_parse(json_array_get(msg->items, i), &a, why, sizeof(why))) {
			gw_write_announce_reject(&rej, &a, "invalid", why);
			continue;
		}
		if (!(t = announce_check(c, &a, &rej, now_us)))
			continue;
		/* The items own their labels: a device named twice in one
		 * announce replaces its record's copy. */
		labels[nacc] = a.labels ? json_dumps(a.labels, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
		const char *lb = labels[nacc] ? labels[nacc] : "{}";
		d = announce_take(c, &a, t, lb);
		if (hub_prov_type_signed(t))
			hub_prov_warm(hub, a.device);
		anom_prefetch(hub, d->id, t);
		items[nacc] = (struct hub_announce_item){ a.device, schema_type_name(t), lb, strlen(lb) };
		if (acc.len)
			hub_buf_puts(&acc, ",");
		hub_buf_json_str(&acc, a.device, a.device_len);
		if (!r->announced)
			r->announced = hub_xcalloc(n, sizeof(char *));
		r->announced[r->nannounced++] = hub_xstrdup(d->id);
		nacc++;
	}
	hub->metrics.devices_rejected_total += n - nacc;

	hub_buf_puts(&r->rejected, "{\"type\":\"announced\",\"accepted\":[");
	if (acc.len)
		hub_buf_append(&r->rejected, acc.data, acc.len);
	hub_buf_puts(&r->rejected, "],\"rejected\":[");
	if (rej.len)
		hub_buf_append(&r->rejected, rej.data, rej.len);
	hub_buf_puts(&r->rejected, "]}");
	r->is_announce = true;

	if (nacc) {
		r->waiting = true;
		/* Not read until Redis answers: the devices' limits are merged
		 * in before any of their readings is counted. */
		r->holds = true;
		c->holds++;
		if (hub_registry_announce(hub, c->gw, c->conn_id, items, nacc, on_announced, r,
					  &r->regq)) {
			r->waiting = false;
			r->holds = false;
			c->holds--;
			gw_write_error(&r->out, "unavailable", -1, hub->cfg.retry_after_ms,
				       "device registry unavailable; announce again later");
		}
	} else {
		hub_buf_append(&r->out, r->rejected.data, r->rejected.len);
	}
	enqueue(c, r);
	for (size_t i = 0; i < nacc; i++)
		free(labels[i]);
	free(labels);
	free(items);
	hub_buf_free(&acc);
	hub_buf_free(&rej);
}

/* ---- messages ------------------------------------------------------------ */

static void handle_message(struct gw_conn *c, const char *buf, size_t len)
{
	struct hub *hub = c->hub;
	char why[160];
	gw_msg msg;
	enum gw_parse_result rc;

	/* The frame's document lives until gw_msg_clear below: parsed into the
	 * reused arena (hub/jarena.h). Nothing here keeps a json_t past that. */
	hub_jarena_begin();
	rc = gw_msg_parse(buf, len, (size_t)hub->cfg.max_readings_per_frame,
			  (size_t)hub->cfg.max_devices_per_gateway, &msg, why, sizeof(why));
	hub_jarena_end();

	if (rc == GW_BAD_JSON) {
		hub->metrics.frames[HUB_FRAME_BAD_JSON]++;
		queue_error(c, "bad_json", -1, -1, why);
	} else if (rc == GW_BAD_MESSAGE) {
		hub->metrics.frames[HUB_FRAME_BAD_MESSAGE]++;
		queue_error(c, "bad_message", msg.has_seq ? msg.seq : -1, -1, why);
	} else if (msg.type == GW_MSG_TELEMETRY) {
		handle_telemetry(c, &msg);
	} else if (msg.type == GW_MSG_ANNOUNCE) {
		handle_announce(c, &msg);
	} else if (msg.type == GW_MSG_COMMAND_ACK) {
		gw_command_ack ack;
		char bad[128];
		int64_t wait_ms;
		if (gw_command_ack_parse(&msg, &ack, bad, sizeof(bad)))
			queue_error(c, "bad_message", -1, -1, bad);
		else if (!gw_ack_status_valid(ack.status))
			queue_ack_error(c, "bad_message", ack.id, 0,
				    "command_ack status must be received, in_progress, succeeded, failed or rejected");
		else if (gw_command_ack_check(&ack, (size_t)hub->cfg.max_command_result_bytes,
					      bad, sizeof(bad)))
			queue_ack_error(c, "bad_message", ack.id, 0, bad);
		else if ((wait_ms = hub_bucket_take(&c->ack_bucket, hub->cfg.command_ack_rate,
						    hub->cfg.command_ack_burst, 1, hub_mono_us()))) {
			limits_changed(c);
			hub->metrics.command_acks_limited_total++;
			queue_ack_error(c, "rate_limited", ack.id, wait_ms,
					"command_acks faster than command-ack-rate; send this one again later");
		} else {
			struct hub_ev_command_ack ev = { &c->link, &ack };
			limits_changed(c);
			hub_emit(hub, HUB_EV_COMMAND_ACK, &ev);
		}
	}
	gw_msg_clear(&msg);
}

static int on_receive(struct gw_conn *c, const char *in, size_t len)
{
	struct lws *wsi = c->wsi;
	size_t max = (size_t)c->hub->cfg.max_frame_bytes;
	struct ws_piece p = {
		in, len, lws_is_first_fragment(wsi) != 0, false, lws_frame_is_binary(wsi) != 0,
		lws_remaining_packet_payload(wsi),
	};
	const char *msg, *reason;
	size_t msglen;
	int code;

	p.final = lws_is_final_fragment(wsi) && !p.remaining;
	c->rx_us = hub_mono_us();
	c->hub->metrics.bytes_received[HUB_WS_GATEWAY] += len;
	if (!c->rx.discarding && (c->closing || c->draining))
		return 0;
	switch (ws_rx_feed(&c->rx, &p, max, DISCARD_FACTOR * max, &msg, &msglen, &code, &reason)) {
	case WS_RX_MORE:
		break;
	case WS_RX_MESSAGE:
		handle_message(c, msg, msglen);
		ws_rx_done(&c->rx, RX_KEEP_BYTES);
		break;
	case WS_RX_REFUSED:
		if (code == WS_CLOSE_UNSUPPORTED) {
			c->hub->metrics.binary_closed[HUB_WS_GATEWAY]++;
			hub_warn("gateway %s #%llu: binary message: closing with 1003",
				 c->gw, (unsigned long long)c->serial);
		} else {
			c->hub->metrics.frames_too_large_total++;
			hub_warn("gateway %s #%llu: message over max-frame-bytes %zu: closing with 1009",
				 c->gw, (unsigned long long)c->serial, max);
		}
		if (!c->rx.discarding)
			conn_close(c, code, reason);
		break;
	case WS_RX_CLOSE:
		conn_close(c, code, reason);
		break;
	}
	return 0;
}

static int on_writeable(struct gw_conn *c)
{
	struct gw_reply *r = c->head;

	if (r && !r->waiting) {
		if (write_head(c))
			return -1;
		if (c->head && !c->head->waiting)
			lws_callback_on_writable(c->wsi);
		return 0;
	}
	if (c->closing) {
		/* Replies still waiting on Redis are dropped with the socket; the
		 * gateway resends those frames and the seq window dedupes them. */
		lws_close_reason(c->wsi, (enum lws_close_status)c->close_code,
				 (unsigned char *)c->close_reason, strlen(c->close_reason));
		return -1;
	}
	if (!r && c->draining) {
		lws_close_reason(c->wsi, LWS_CLOSE_STATUS_GOINGAWAY,
				 (unsigned char *)"hub shutting down", 17);
		return -1;
	}
	return 0;
}

/* ---- connection open / close / takeover ---------------------------------- */

static void takeover_close(struct gw_conn *old, const char *new_conn)
{
	struct hub *hub = old->hub;
	const char *gw = old->gw;

	if (old->closing || !old->wsi)
		return;
	hub_info("gateway %s #%llu: taken over by %s", gw,
		 (unsigned long long)old->serial, new_conn);
	hub->metrics.takeovers_total++;
	if (hub_strmap_get(&hub->gw->conns, gw, strlen(gw)) == old)
		hub_strmap_del(&hub->gw->conns, gw, strlen(gw));
	conns_changed(hub->gw);
	/* Close now, even with replies queued: the new connection owns the
	 * gateway; unacked frames are resent there and deduplicated by seq. */
	old->closing = true;
	old->close_code = CLOSE_TAKEOVER;
	old->close_reason = "taken over by a new connection";
	lws_set_timeout(old->wsi, PENDING_TIMEOUT_USER_OK, CLOSE_GRACE_S);
	while (old->head && !old->head->waiting) {
		struct gw_reply *r = old->head;
		old->head = r->next;
		old->queued--;
		reply_free(r);
	}
	if (!old->head)
		old->tail = NULL;
	/* Waiting replies stay linked until Redis answers; the writer closes
	 * first because `closing` skips them. */
	lws_callback_on_writable(old->wsi);
}

/* "<gateway> <epoch> <conn id>" from any instance (this one included): a
 * connection with a lower epoch than the message's has been superseded. */
static void on_takeover_msg(const char *channel, const char *payload, size_t len,
			    void *arg)
{
	struct hub *hub = arg;
	char msg[HUB_ID_MAX * 4], gw[HUB_ID_MAX + 1], conn[HUB_ID_MAX * 2 + 32];
	long long epoch;
	struct gw_conn *c;

	(void)channel;
	if (len >= sizeof(msg))
		return;
	memcpy(msg, payload, len);
	msg[len] = '\0';
	/* conn: "<instance>:<run token>:<serial>", up to 128 + 14 + 20 bytes */
	if (sscanf(msg, "%128s %lld %287s", gw, &epoch, conn) != 3)
		return;
	c = hub_strmap_get(&hub->gw->conns, gw, strlen(gw));
	if (!c || !strcmp(c->conn_id, conn))
		return;
	if (!c->epoch) {
		/* Our own INCR has not answered yet: decide when it does. */
		if (epoch > c->beaten_by)
			c->beaten_by = epoch;
		return;
	}
	if (c->epoch < epoch)
		takeover_close(c, conn);
}

static const char *reply_str(const redisReply *r, size_t i)
{
	if (!r || r->type != REDIS_REPLY_ARRAY || i >= r->elements)
		return NULL;
	r = r->element[i];
	return r->type == REDIS_REPLY_STRING ? r->str : NULL;
}

static long long reply_int(const redisReply *r, size_t i)
{
	if (!r || r->type != REDIS_REPLY_ARRAY || i >= r->elements)
		return 0;
	r = r->element[i];
	return r->type == REDIS_REPLY_INTEGER ? r->integer : 0;
}

/* The gateway's local connection this one replaces goes now (the connect
 * was allowed, or could not be checked), or stays (refused). */
static void settle_displaced(struct gw_conn *c, bool allowed)
{
	struct gw_conn *old = c->displaced;
	struct hub *hub = c->hub;

	if (!old)
		return;
	c->displaced = NULL;
	if (allowed) {
		takeover_close(old, c->conn_id);
	} else if (old->wsi && !old->closing) {
		struct gw_conn *cur = hub_strmap_get(&hub->gw->conns, c->gw, strlen(c->gw));
		if (!cur || cur == c)
			hub_strmap_put(&hub->gw->conns, c->gw, strlen(c->gw), old);
		conns_changed(hub->gw);
	}
	conn_unref(old);
}

/* The connect script's answer: {epoch, allowed, retry ms, TATs}. */
static void on_connect(redisReply *reply, void *arg)
{
	struct gw_conn *c = arg;
	struct hub *hub = c->hub;
	struct hub_config *cfg = &hub->cfg;
	char msg[HUB_ID_MAX * 4];

	c->holds--;
	if (!c->wsi) {
		settle_displaced(c, false); /* gone before it counted */
		conn_unref(c);
		return;
	}
	if (!reply || reply->type != REDIS_REPLY_ARRAY || reply->elements < 6) {
		/* Redis is down: nothing to check against; frames get
		 * `unavailable` until it is back. */
		settle_displaced(c, true);
	} else if (!reply_int(reply, 1)) {
		long long retry = reply_int(reply, 2);
		char why[96];
		snprintf(why, sizeof(why),
			 "reconnecting faster than gateway-connect-rate; retry after %lld ms", retry);
		free(c->close_reason_owned);
		c->close_reason_owned = hub_xstrdup(why);
		hub->metrics.gateway_connects_refused_total++;
		hub_info("gateway %s #%llu: refused: %s", c->gw, (unsigned long long)c->serial,
			 c->close_reason_owned);
		settle_displaced(c, false);
		if (hub_strmap_get(&hub->gw->conns, c->gw, strlen(c->gw)) == c)
			hub_strmap_del(&hub->gw->conns, c->gw, strlen(c->gw));
		conns_changed(hub->gw);
		conn_close(c, CLOSE_CONNECT_RATE, c->close_reason_owned);
	} else {
		int64_t now_us = hub_mono_us(), now_ms = hub_now_ms();
		const char *t;

		settle_displaced(c, true);
		if ((t = reply_str(reply, 3)))
			hub_bucket_merge_tat(&c->bucket, strtoll(t, NULL, 10), cfg->gateway_rate,
					     cfg->gateway_burst, now_us, now_ms);
		if ((t = reply_str(reply, 4)))
			hub_bucket_merge_tat(&c->announce_bucket, strtoll(t, NULL, 10),
					     cfg->announce_rate, cfg->announce_burst, now_us, now_ms);
		if ((t = reply_str(reply, 5)))
			hub_bucket_merge_tat(&c->ack_bucket, strtoll(t, NULL, 10),
					     cfg->command_ack_rate, cfg->command_ack_burst, now_us, now_ms);
		c->epoch = reply_int(reply, 0);
		if (c->beaten_by > c->epoch) {
			takeover_close(c, "a newer connection");
		} else {
			snprintf(msg, sizeof(msg), "%s %lld %s", c->gw, (long long)c->epoch,
				 c->conn_id);
			hub_redis_publish(hub->redis, HUB_CH_TAKEOVER, msg, strlen(msg));
		}
	}
	conn_update_flow(c);
	conn_unref(c);
}

/* "<device> <conn>" lines from any instance: those devices now belong to
 * conn. A local connection that had one stops storing its readings (they
 * are refused as unknown_device until it announces the device again) and no
 * longer gets its commands. */
static void on_devtake_msg(const char *channel, const char *payload, size_t len, void *arg)
{
	struct hub *hub = arg;
	const char *p = payload, *end = payload + len;

	(void)channel;
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p)), *sp;
		const char *le = nl ? nl : end;
		sp = memchr(p, ' ', (size_t)(le - p));
		if (sp && sp > p && (size_t)(sp - p) <= HUB_ID_MAX) {
			struct gw_conn *c = hub_strmap_get(&hub->gw->dev_conns, p, (size_t)(sp - p));
			size_t cl = (size_t)(le - sp - 1);
			if (c && (strlen(c->conn_id) != cl || memcmp(c->conn_id, sp + 1, cl))) {
				struct gw_dev *d = hub_strmap_get(&c->devices, p, (size_t)(sp - p));
				if (d && !d->lost) {
					d->lost = true;
					hub->metrics.devices_taken_total++;
				}
				dev_conn_del(hub->gw, p, (size_t)(sp - p));
			}
		}
		p = le + 1;
	}
}

struct seen_sent {
	size_t n;
	struct seen_ent e[];
};

/* Devices the seen script found owned by another connection: their takeover
 * notice was missed (pub/sub down, or raced); drop them now. */
static void on_seen(redisReply *reply, void *arg)
{
	struct seen_sent *ss = arg;

	for (size_t i = 0; reply && reply->type == REDIS_REPLY_ARRAY && i < reply->elements; i++) {
		const redisReply *x = reply->element[i];
		if (x->type != REDIS_REPLY_INTEGER || x->integer < 0 || (size_t)x->integer >= ss->n)
			continue;
		struct seen_ent *e = &ss->e[x->integer];
		if (e->c->wsi && !e->d->lost) {
			e->d->lost = true;
			struct gateways *gws = e->c->hub->gw;
			e->c->hub->metrics.devices_taken_total++;
			if (hub_strmap_get(&gws->dev_conns, e->d->id, strlen(e->d->id)) == e->c)
				dev_conn_del(gws, e->d->id, strlen(e->d->id));
		}
	}
	for (size_t i = 0; i < ss->n; i++)
		conn_unref(ss->e[i].c);
	free(ss);
}

static void seen_batch_send(struct hub *hub)
{
	struct gateways *gws = hub->gw;
	size_t n = gws->seen.n;
	struct seen_sent *ss;

	if (!n)
		return;
	gws->seen.n = 0;
	ss = hub_xmalloc(sizeof(*ss) + n * sizeof(ss->e[0]));
	ss->n = n;
	memcpy(ss->e, gws->seen.e, n * sizeof(ss->e[0]));
	for (size_t i = 0; i < n; i++)
		ss->e[i].c->refs++;
	if (hub_registry_seen(hub, gws->seen.now_ms, gws->seen.items, n, on_seen, ss))
		on_seen(NULL, ss);
}

static void save_limits(struct gw_conn *c, int64_t now_us, int64_t now_ms, bool closing)
{
	struct hub_config *cfg = &c->hub->cfg;

	if (!c->limits_dirty)
		return;
	c->limits_dirty = false;
	hub_registry_save_limits(c->hub, c->gw,
		hub_bucket_tat_ms(&c->bucket, cfg->gateway_rate, cfg->gateway_burst, now_us, now_ms),
		hub_bucket_tat_ms(&c->announce_bucket, cfg->announce_rate, cfg->announce_burst,
				  now_us, now_ms),
		hub_bucket_tat_ms(&c->ack_bucket, cfg->command_ack_rate, cfg->command_ack_burst,
				  now_us, now_ms), closing);
}

static void flush_seen_conn(struct gw_conn *c, int64_t now_ms)
{
	struct gateways *gws = c->hub->gw;
	struct hub_config *cfg = &c->hub->cfg;

	gws->seen.now_ms = now_ms;
	save_limits(c, gws->seen.now_us, now_ms, false);
	for (size_t i = 0; i < c->nseen; i++) {
		struct gw_dev *d = hub_strmap_get(&c->devices, c->seen[i], strlen(c->seen[i]));
		if (!d)
			continue;
		d->seen = false;
		gws->seen.e[gws->seen.n] = (struct seen_ent){ c, d };
		gws->seen.items[gws->seen.n] = (struct hub_seen_item){
			d->id, c->conn_id,
			hub_bucket_tat_ms(&d->bucket, cfg->device_rate, cfg->device_burst,
					  gws->seen.now_us, now_ms),
		};
		if (++gws->seen.n == SEEN_BATCH)
			seen_batch_send(c->hub);
	}
	c->nseen = 0;
}

/* last_seen of devices with readings, once a second per connection, instead
 * of a Redis write per frame. */
static void flush_seen(lws_sorted_usec_list_t *sul)
{
	struct gateways *gws = lws_container_of(sul, struct gateways, sul_seen);
	struct hub *hub = gws->hub;
	int64_t now = hub_now_ms();

	gws->seen.slice = (gws->seen.slice + 1) % SEEN_SLICES;
	gws->seen.now_us = hub_mono_us();
	if (hub_redis_up(hub->redis)) {
		struct gw_conn *c;

		while ((c = gws->dirty[gws->seen.slice])) {
			dirty_del(c);
			/* a connection replaced or closed meanwhile is not flushed */
			if (hub_strmap_get(&gws->conns, c->gw, strlen(c->gw)) == c)
				flush_seen_conn(c, now);
		}
		seen_batch_send(hub);
	}
	lws_sul_schedule(hub->ctx, 0, sul, flush_seen, 1000 * 1000 / SEEN_SLICES);
}

static void rebuild_drop(struct gateways *gws);

/* The upgrade at GW_PATH: a JWT in the Authorization header (401 without
 * one, or with one that does not verify) and, with mTLS, a client
 * certificate whose CN is the token's sub. */
static int confirm_upgrade(struct lws *wsi, struct hub *hub, struct hub_handshake *hs, void *ctx)
{
	char authz[HUB_AUTHZ_MAX + 16];
	const char *tok;
	size_t tlen;
	enum hub_bearer b = hub_http_bearer(wsi, authz, sizeof(authz), &tok, &tlen);
	enum auth_result rc;

	(void)ctx;
	if (b != HUB_BEARER_OK) {
		hub->metrics.auth_failures_total++;
		return hub_http_refuse_upgrade(wsi, 401, "unauthorized", hub_http_bearer_problem(b));
	}
	rc = auth_verify_jwt(hub->auth, tok, tlen, hub_now_ms() / 1000, &hs->who);
	if (rc != AUTH_OK) {
		hub->metrics.auth_failures_total++;
		hub_info("gateway upgrade refused: %s", auth_strerror(rc));
		return hub_http_refuse_upgrade(wsi, 401, "unauthorized", auth_strerror(rc));
	}
	if (hub_revoked(hub, &hs->who)) {
		hub->metrics.auth_failures_total++;
		hub_info("gateway upgrade refused: credentials of %s revoked", hs->who.name);
		return hub_http_refuse_upgrade(wsi, 401, "unauthorized", "credentials revoked");
	}
	if (hub->cfg.tls_client_ca) {
		union lws_tls_cert_info_results *ci;
		char big[sizeof(*ci) + 256];

		ci = (union lws_tls_cert_info_results *)big;
		if (lws_tls_peer_cert_info(wsi, LWS_TLS_CERT_INFO_COMMON_NAME, ci,
					   sizeof(big) - sizeof(*ci) + sizeof(ci->ns.name)) ||
		    strcmp(ci->ns.name, hs->who.name)) {
			hub->metrics.auth_failures_total++;
			hub_info("gateway upgrade refused: client certificate CN does not match sub %s",
				 hs->who.name);
			return hub_http_refuse_upgrade(wsi, 401, "unauthorized",
						       "client certificate CN does not match the token's sub");
		}
	}
	return 0;
}

static int on_established(struct lws *wsi, struct gw_pss *pss, struct hub *hub)
{
	struct hub_handshake hs;
	struct gw_conn *c;

	if (!hub_http_take_handshake(wsi, GW_PATH, &hs))
		return -1; /* not authenticated by the gateway upgrade */
	c = hub_xcalloc(1, sizeof(*c));
	c->link.ops = &link_ops;
	c->wsi = wsi;
	c->hub = hub;
	c->refs = 1;
	c->serial = ++hub->gw->next_serial;
	c->rx_us = hub_mono_us();
	/* Only what the connection needs of hs.who (272 bytes, mostly the
	 * fixed arrays of its strings): a connection is 200 bytes smaller. */
	c->gw = hub_xstrdup(hs.who.name);
	c->jti = hs.who.jti[0] ? hub_xstrdup(hs.who.jti) : NULL;
	c->allowed = hs.who.devices;  /* moved */
	memset(&hs.who.devices, 0, sizeof(hs.who.devices));
	auth_principal_clear(&hs.who);
	size_t idl = strlen(hub->instance_id) + sizeof(hub->run_token) + 24;
	c->conn_id = hub_xmalloc(idl);
	snprintf(c->conn_id, idl, "%s:%s:%llu", hub->instance_id, hub->run_token,
		 (unsigned long long)c->serial);
	int64_t now_us = hub_mono_us();
	hub_bucket_init(&c->bucket, hub->cfg.gateway_burst, now_us);
	hub_bucket_init(&c->announce_bucket, hub->cfg.announce_burst, now_us);
	hub_bucket_init(&c->ack_bucket, hub->cfg.command_ack_burst, now_us);
	pss->conn = c;

	/* The connect script (hub/registry.c) orders the gateway's connections
	 * across instances by a per-gateway epoch, so a late notice about an
	 * older connection never closes a newer one; applies the connect rate;
	 * and returns the limits the gateway's earlier connections left. The
	 * connection is not read until it answers. A local connection of the
	 * same gateway goes once the connect is allowed (settle_displaced);
	 * other instances hear of it through Redis. */
	struct gw_conn *old = hub_strmap_get(&hub->gw->conns, c->gw, strlen(c->gw));
	if (old && old->wsi && !old->closing) {
		c->displaced = old;
		old->refs++;
	}
	hub_strmap_put(&hub->gw->conns, c->gw, strlen(c->gw), c);
	conns_changed(hub->gw);
	c->holds++;
	if (!hub_registry_connect(hub, c->gw, hub->cfg.gateway_connect_rate,
				  hub->cfg.gateway_connect_burst, on_connect, c, &c->connect_q)) {
		c->refs++;
	} else {
		c->holds--;
		settle_displaced(c, true);
	}
	conn_update_flow(c);
	hub->metrics.connections_total++;
	hub_info("gateway %s #%llu: connected", c->gw, (unsigned long long)c->serial);
	if (hub->draining) {
		c->draining = true;
		lws_callback_on_writable(wsi);
	}
	return 0;
}

struct offline_ctx {
	const char **ids;
	int64_t *tats;
	size_t n;
	const struct hub_config *cfg;
	int64_t now_us, now_ms;
};

static void collect_dev(const char *key, void *value, void *arg)
{
	struct offline_ctx *o = arg;
	struct gw_dev *d = value;

	o->ids[o->n] = key;
	o->tats[o->n++] = hub_bucket_tat_ms(&d->bucket, o->cfg->device_rate, o->cfg->device_burst,
					    o->now_us, o->now_ms);
}

/* Why the connection ended, for iot_hub_gateway_disconnects_total: the
 * close the hub started, else the gateway's close frame, else silence past
 * the ping timeout (lws hung up), else a socket that just ended. */
static enum hub_disconnect disconnect_reason(const struct gw_conn *c)
{
	if (c->closing) {
		switch (c->close_code) {
		case CLOSE_TAKEOVER:
			return HUB_DISC_TAKEOVER;
		case CLOSE_CONNECT_RATE:
			return HUB_DISC_CONNECT_RATE;
		case CLOSE_REVOKED:
			return HUB_DISC_REVOKED;
		case LWS_CLOSE_STATUS_GOINGAWAY:
			return HUB_DISC_SHUTDOWN;
		case LWS_CLOSE_STATUS_ABNORMAL_CLOSE:
			return HUB_DISC_WRITE_FAILED;
		default:
			return HUB_DISC_PROTOCOL;
		}
	}
	if (c->draining)
		return HUB_DISC_SHUTDOWN;
	if (c->peer_closed)
		return HUB_DISC_PEER_CLOSE;
	if (hub_mono_us() - c->rx_us >= ((int64_t)c->hub->cfg.ping_timeout_s - 1) * 1000000)
		return HUB_DISC_PING_TIMEOUT;
	return HUB_DISC_LOST;
}

static void on_closed(struct gw_pss *pss)
{
	struct gw_conn *c = pss->conn;
	struct hub *hub;

	if (!c)
		return;
	pss->conn = NULL;
	hub = c->hub;
	hub->metrics.gateway_disconnects[disconnect_reason(c)]++;
	hub_info("gateway %s #%llu: disconnected", c->gw, (unsigned long long)c->serial);
	if (hub_strmap_get(&hub->gw->conns, c->gw, strlen(c->gw)) == c)
		hub_strmap_del(&hub->gw->conns, c->gw, strlen(c->gw));
	conns_changed(hub->gw);
	int64_t now_us = hub_mono_us(), now_ms = hub_now_ms();
	save_limits(c, now_us, now_ms, true);
	if (c->devices.count) {
		struct offline_ctx o = {
			hub_xmalloc(c->devices.count * sizeof(char *)),
			hub_xmalloc(c->devices.count * sizeof(int64_t)), 0, &hub->cfg, now_us, now_ms,
		};
		hub_strmap_foreach(&c->devices, collect_dev, &o);
		for (size_t i = 0; i < o.n; i++)
			if (hub_strmap_get(&hub->gw->dev_conns, o.ids[i], strlen(o.ids[i])) == c)
				dev_conn_del(hub->gw, o.ids[i], strlen(o.ids[i]));
		hub_registry_offline(hub, c->conn_id, o.ids, o.tats, o.n);
		free(o.ids);
		free(o.tats);
	}
	c->wsi = NULL;
	/* What still waits for room at the registry (hub/registry.h) never
	 * goes: sent after the offline above, it would register devices of a
	 * connection that is gone. Each is answered NULL now. */
	hub_registry_cancel(hub, &c->connect_q);
	hub_registry_cancel(hub, &c->rebuild_q);
	/* Ready replies die now; waiting ones when Redis answers (or now, for
	 * an announce that had not left the hub yet). */
	struct gw_reply **pp = &c->head;
	while (*pp) {
		struct gw_reply *r = *pp;
		if (!r->waiting || r->regq) {
			*pp = r->next;
			if (r->waiting)
				hub_registry_cancel(hub, &r->regq); /* on_announced frees it */
			else
				reply_free(r);
		} else {
			pp = &r->next;
		}
	}
	c->head = c->tail = NULL; /* the waiting ones are owned by their callbacks */
	conn_unref(c);
}

static int gw_callback(struct lws *wsi, enum lws_callback_reasons reason,
		       void *user, void *in, size_t len);

static int gw_callback(struct lws *wsi, enum lws_callback_reasons reason,
		       void *user, void *in, size_t len)
{
	const struct lws_protocols *bound = lws_get_protocol(wsi);
	struct gw_pss *pss = bound && bound->callback == gw_callback ? user : NULL;
	struct hub *hub = lws_context_user(lws_get_context(wsi));

	switch (reason) {
	case LWS_CALLBACK_ESTABLISHED:
		if (!pss)
			return -1;
		if (on_established(wsi, pss, hub))
			return -1;
		if (!pss->conn->paused)   /* else started once it is read */
			hub_keepalive_start(hub, &pss->ka, wsi);
		return 0;
	case LWS_CALLBACK_RECEIVE:
		if (!pss->conn)
			return -1;
		return on_receive(pss->conn, in, len);
	case LWS_CALLBACK_SERVER_WRITEABLE: {
		int k;

		if (!pss->conn)
			return -1;
		if ((k = hub_keepalive_writeable(hub, &pss->ka)))
			return k < 0 ? -1 : 0;
		return on_writeable(pss->conn);
	}
	case LWS_CALLBACK_WS_PEER_INITIATED_CLOSE:
		if (pss && pss->conn)
			pss->conn->peer_closed = true;
		break;
	case LWS_CALLBACK_RECEIVE_PONG:
		if (pss && pss->conn)
			pss->conn->rx_us = hub_mono_us();
		if (pss)
			hub_keepalive_pong(hub, &pss->ka);
		break;
	case LWS_CALLBACK_CLOSED:
	case LWS_CALLBACK_WSI_DESTROY:
		if (pss) {
			hub_keepalive_stop(hub, &pss->ka);
			on_closed(pss);
		}
		break;
	default:
		break;
	}
	return 0;
}


/* ---- shutdown ------------------------------------------------------------ */

struct drain_ctx {
	bool force;
	unsigned open;
};

static void drain_one(const char *key, void *value, void *arg)
{
	struct gw_conn *c = value;
	struct drain_ctx *d = arg;

	(void)key;
	d->open++;
	if (!c->wsi)
		return;
	if (!c->draining) {
		c->draining = true;
		if (!c->paused) {
			c->paused = true;
			lws_rx_flow_control(c->wsi, 0);
		}
	}
	if (d->force || !c->waiting)
		lws_callback_on_writable(c->wsi);
	if (d->force && !c->closing)
		conn_close(c, LWS_CLOSE_STATUS_GOINGAWAY, "hub shutting down");
}


/* ---- the link other modules see (hub/link.h) ---------------------------- */

static const char *link_id(const struct hub_link *l)
{
	return ((const struct gw_conn *)l)->conn_id;
}

static bool link_has_device(const struct hub_link *l, const char *device)
{
	const struct gw_conn *c = (const struct gw_conn *)l;
	const struct gw_dev *d = hub_strmap_get(&c->devices, device, strlen(device));

	return d && !d->lost;
}

static bool link_open(const struct hub_link *l)
{
	const struct gw_conn *c = (const struct gw_conn *)l;

	return c->wsi && !c->closing;
}

static void link_send(struct hub_link *l, const char *msg, size_t len)
{
	struct gw_conn *c = (struct gw_conn *)l;
	struct gw_reply *r;

	if (!c->wsi || c->closing)
		return;
	r = reply_new(c);
	hub_buf_append(&r->out, msg, len);
	enqueue(c, r);
}

static void link_hold(struct hub_link *l)
{
	((struct gw_conn *)l)->refs++;
}

static void link_release(struct hub_link *l)
{
	conn_unref((struct gw_conn *)l);
}

static const struct hub_link_ops link_ops = {
	link_id, link_has_device, link_open, link_send, link_hold, link_release,
};

/* The local connection that announced device last, if it can still take
 * messages. */
static struct hub_link *link_for_device(void *ctx, const char *device)
{
	struct gateways *gws = ctx;
	struct gw_conn *c = hub_strmap_get(&gws->dev_conns, device, strlen(device));

	return c && c->wsi && !c->closing && !c->draining ? &c->link : NULL;
}

/* ---- re-announcing after Redis lost the registry (hub/lease.c) ----------
 * Every device of every live connection goes through the announce script
 * again (mode rebuild), a connection at a time, with at most
 * REBUILD_INFLIGHT devices at Redis, so that thousands of connections do
 * not queue one burst ahead of the frames. */

#define REBUILD_INFLIGHT 2048

struct reannounce {
	struct gw_conn *c;         /* a reference is held */
	size_t n;
	char *ids[];
};

static void rebuild_step(lws_sorted_usec_list_t *sul);

static void on_reannounced(redisReply *reply, void *arg)
{
	struct reannounce *ra = arg;
	struct gw_conn *c = ra->c;
	struct hub *hub = c->hub;
	struct gateways *gws = hub->gw;
	size_t nok = 0;

	if (!reply || reply->type != REDIS_REPLY_ARRAY) {
		if (reply && reply->type == REDIS_REPLY_ERROR)
			hub_err("gateway %s: re-announce failed: %s", c->gw, reply->str);
		if (c->wsi && !c->closing)
			gws->rb.failed = true; /* a closed one has nothing to re-announce */
	} else {
		for (size_t i = 0; i < ra->n; i++) {
			const redisReply *t = i < reply->elements ? reply->element[i] : NULL;
			const char *id = ra->ids[i];

			if (t && t->type == REDIS_REPLY_STRING && !strcmp(t->str, "-1")) {
				/* Another connection holds it now: as a missed devtake. */
				struct gw_dev *d = hub_strmap_get(&c->devices, id, strlen(id));
				if (d && !d->lost) {
					d->lost = true;
					hub->metrics.devices_taken_total++;
				}
				if (hub_strmap_get(&gws->dev_conns, id, strlen(id)) == c)
					dev_conn_del(gws, id, strlen(id));
				continue;
			}
			ra->ids[nok++] = ra->ids[i];
		}
		if (c->wsi && !c->closing) {
			struct hub_ev_announced ev = { &c->link, (const char *const *)ra->ids, nok };
			hub_emit(hub, HUB_EV_DEVICES_ANNOUNCED, &ev);
		}
	}
	gws->rb.inflight -= ra->n;
	for (size_t i = 0; i < ra->n; i++)
		free(ra->ids[i]);
	conn_unref(c);
	free(ra);
	if (gws->rb.todo && !hub->draining)
		lws_sul_schedule(hub->ctx, 0, &gws->rb.sul, rebuild_step, 1);
}

struct rebuild_items {
	struct hub_announce_item *items;
	struct reannounce *ra;
};

static void collect_reannounce(const char *key, void *value, void *arg)
{
	struct rebuild_items *ri = arg;
	struct gw_dev *d = value;
	size_t i = ri->ra->n;

	(void)key;
	if (d->lost || !d->type_name)
		return;
	ri->items[i].device = d->id;
	ri->items[i].type = d->type_name;
	ri->items[i].labels = d->labels ? d->labels : "{}";
	ri->items[i].labels_len = d->labels ? d->labels_len : 2;
	ri->ra->ids[i] = hub_xstrdup(d->id);
	ri->ra->n++;
}

/* Sends one connection's devices; takes over the reference on c. */
static void reannounce_conn(struct gw_conn *c)
{
	struct hub *hub = c->hub;
	struct rebuild_items ri;
	size_t n = c->devices.count;

	if (!c->wsi || c->closing || !n || c->rebuild_q) {
		/* (an earlier round's re-announce of it still waits: it goes) */
		conn_unref(c);
		return;
	}
	ri.items = hub_xmalloc(n * sizeof(*ri.items));
	ri.ra = hub_xcalloc(1, sizeof(*ri.ra) + n * sizeof(char *));
	ri.ra->c = c;
	hub_strmap_foreach(&c->devices, collect_reannounce, &ri);
	if (c->epoch > 0)
		hub_registry_epoch_floor(hub, c->gw, c->epoch);
	if (!ri.ra->n) {
		free(ri.items);
		free(ri.ra);
		conn_unref(c);
		return;
	}
	if (hub_registry_reannounce(hub, c->gw, c->conn_id, ri.items, ri.ra->n,
				    on_reannounced, ri.ra, &c->rebuild_q)) {
		hub->gw->rb.failed = true;
		for (size_t i = 0; i < ri.ra->n; i++)
			free(ri.ra->ids[i]);
		free(ri.ra);
		conn_unref(c);
	} else {
		hub->gw->rb.inflight += ri.ra->n;
	}
	free(ri.items);
}

static void rebuild_step(lws_sorted_usec_list_t *sul)
{
	struct gateways *gws = lws_container_of(sul, struct gateways, rb.sul);

	while (gws->rb.todo && gws->rb.next < gws->rb.n && gws->rb.inflight < REBUILD_INFLIGHT)
		reannounce_conn(gws->rb.todo[gws->rb.next++]);
	if (gws->rb.todo && gws->rb.next == gws->rb.n) {
		free(gws->rb.todo);
		gws->rb.todo = NULL;
		gws->rb.n = gws->rb.next = 0;
	}
}

static void rebuild_drop(struct gateways *gws)
{
	lws_sul_cancel(&gws->rb.sul);
	while (gws->rb.todo && gws->rb.next < gws->rb.n)
		conn_unref(gws->rb.todo[gws->rb.next++]);
	free(gws->rb.todo);
	gws->rb.todo = NULL;
	gws->rb.n = gws->rb.next = 0;
}

struct rebuild_count {
	struct gateways *gws;
	size_t conns, devices;
};

static void snapshot_conn(const char *key, void *value, void *arg)
{
	struct gw_conn *c = value;
	struct rebuild_count *rc = arg;

	(void)key;
	if (!c->wsi || c->closing || !c->devices.count)
		return;
	c->refs++;
	rc->gws->rb.todo[rc->gws->rb.n++] = c;
	rc->conns++;
	rc->devices += c->devices.count;
}

/* Re-announces the devices of every live gateway connection of this hub
 * (Redis lost the registry, or this instance's lease was reaped), paced,
 * through the announce script in rebuild mode; their pending commands go
 * out as after an announce. A call while one runs starts over. */
static void reannounce_all(struct gateways *gws)
{
	struct rebuild_count rc = { gws, 0, 0 };

	if (gws->hub->draining)
		return;
	rebuild_drop(gws); /* a newer loss: start again from the top */
	gws->rb.failed = false;
	gws->rb.todo = hub_xmalloc((gws->conns.count + 1) * sizeof(*gws->rb.todo));
	hub_strmap_foreach(&gws->conns, snapshot_conn, &rc);
	hub_info("re-announcing %zu devices of %zu gateway connections", rc.devices, rc.conns);
	rebuild_step(&gws->rb.sul);
}

/* Credentials were revoked: the connections they cover close with 4401
 * (their gateways cannot connect again with them: confirm_upgrade). */
struct revoked_scan {
	const struct hub_ev_revoked *ev;
	struct gw_conn **hit;
	size_t n, cap;
};

static void revoked_one(const char *key, void *value, void *arg)
{
	struct revoked_scan *rs = arg;
	struct gw_conn *c = value;

	(void)key;
	if (!c->wsi || c->closing)
		return;
	if (rs->ev->jti ? !c->jti || strcmp(c->jti, rs->ev->value) : strcmp(c->gw, rs->ev->value))
		return;
	if (rs->n == rs->cap) {
		rs->cap = rs->cap ? 2 * rs->cap : 4;
		rs->hit = hub_xrealloc(rs->hit, rs->cap * sizeof(*rs->hit));
	}
	rs->hit[rs->n++] = c;
}

static void on_revoked(struct hub *hub, enum hub_event ev, const void *payload, void *ctx)
{
	struct gateways *gws = ctx;
	struct revoked_scan rs = { payload, NULL, 0, 0 };

	(void)hub;
	(void)ev;
	hub_strmap_foreach(&gws->conns, revoked_one, &rs);
	for (size_t i = 0; i < rs.n; i++) {
		hub_info("gateway %s #%llu: credentials revoked: closing with 4401", rs.hit[i]->gw,
			 (unsigned long long)rs.hit[i]->serial);
		conn_close(rs.hit[i], CLOSE_REVOKED, "credentials revoked");
	}
	free(rs.hit);
}

/* The lease was renewed: re-announce when Redis lost this run's devices,
 * or when the last re-announce got no answer (Redis went down meanwhile). */
static void on_lease_renewed(struct hub *hub, enum hub_event ev, const void *payload, void *ctx)
{
	const struct hub_ev_lease *l = payload;
	struct gateways *gws = ctx;

	(void)hub;
	(void)ev;
	if (l->rebuild || gws->rb.failed)
		reannounce_all(gws);
}

/* ---- the module ---------------------------------------------------------- */

static void gw_module_protocol(const struct hub *hub, struct lws_protocols *out)
{
	*out = (struct lws_protocols){ GW_SUBPROTOCOL, gw_callback, sizeof(struct gw_pss),
				       (size_t)hub->cfg.rx_buffer_bytes, 0, NULL, 0 };
}

static int gw_module_start(struct hub *hub, char *err, size_t errlen)
{
	struct gateways *gws = hub_xcalloc(1, sizeof(*gws));

	(void)err;
	(void)errlen;
	gws->hub = hub;
	hub->gw = gws;
	hub_http_add_upgrade(hub, GW_PATH, GW_SUBPROTOCOL, confirm_upgrade, NULL);
	hub_links_provide(hub, link_for_device, gws);
	hub_observe(hub, HUB_EV_LEASE_RENEWED, on_lease_renewed, gws);
	hub_observe(hub, HUB_EV_REVOKED, on_revoked, gws);
	hub_redis_subscribe(hub->redis, HUB_CH_TAKEOVER, on_takeover_msg, hub);
	hub_redis_subscribe(hub->redis, HUB_CH_DEVTAKE, on_devtake_msg, hub);
	lws_sul_schedule(hub->ctx, 0, &gws->sul_seen, flush_seen, 1000 * 1000 / SEEN_SLICES);
	return 0;
}

/* Shutdown: stops reading every gateway and closes each with 1001 once its
 * in-flight frames are answered (force: at once). Returns how many gateway
 * connections are still open. */
static unsigned gw_module_drain(struct hub *hub, bool force)
{
	struct drain_ctx d = { force, 0 };

	hub_strmap_foreach(&hub->gw->conns, drain_one, &d);
	return d.open;
}

static void gw_module_stop(struct hub *hub)
{
	lws_sul_cancel(&hub->gw->sul_seen);
	rebuild_drop(hub->gw);
}

static void free_value(const char *key, void *value, void *arg)
{
	(void)key;
	(void)arg;
	free(value);
}

static void gw_module_free(struct hub *hub)
{
	struct gateways *gws = hub->gw;

	if (!gws)
		return;
	hub_strmap_free(&gws->conns);
	hub_strmap_free(&gws->dev_conns);
	hub_strmap_foreach(&gws->type_names, free_value, NULL);
	hub_strmap_free(&gws->type_names);
	hub_buf_free(&gws->scratch.vals);
	hub_buf_free(&gws->scratch.feed);
	free(gws->scratch.refs);
	free(gws->scratch.sr);
	free(gws->scratch.groups);
	free(gws->scratch.spans);
	free(gws->scratch.ev);
	free(gws->scratch.fields);
	free(gws);
	hub->gw = NULL;
}

const struct hub_module gw_module = {
	.name = "gateway",
	.protocol = gw_module_protocol,
	.start = gw_module_start,
	.drain = gw_module_drain,
	.stop = gw_module_stop,
	.free = gw_module_free,
};
