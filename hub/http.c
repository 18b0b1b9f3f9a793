/*
 * http.c - protocols[0]: every connection until its WebSocket upgrade.
 * Parses nothing itself (lws does); checks the limits no route accepts,
 * matches the route tables the modules registered, authenticates API keys,
 * collects bodies, and writes the answers (see http.h for the contracts and
 * docs/protocol.md for the limits a client meets).
 */
#include "hub/http.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

#include "hub/hub.h"
#include "hub/log.h"
#include "hub/lws_quirks.h"
#include "hub/module.h"
#include "hub/util.h"

#define BODY_CHUNK 16384

/* A response whose client takes nothing of it is cut off after this long. */
#define STREAM_IDLE_S 60

/* Header room for one response's status line and headers. */
#define HEAD_ROOM 1280

/* The dashboard (web/) loads only its own files and talks only to this hub. */
#define CSP "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; frame-ancestors 'none'"
#define WWW_AUTHENTICATE "Bearer realm=\"iot-hub\""

/* ---- registrations ----------------------------------------------------------- */

struct route_table {
	const struct hub_route *routes;
	size_t n;
	void *ctx;
	struct hub_route_stat *stats;  /* one per route */
};

struct upgrade {
	const char *path, *subprotocol;
	hub_upgrade_fn confirm;
	void *ctx;
};

/* The module: what the other modules registered. */
struct hub_http {
	struct hub *hub;
	struct route_table *tables;
	size_t ntables;
	struct upgrade *upgrades;
	size_t nupgrades;
	hub_route_fn fallback;
	void *fallback_ctx;
	struct hub_route_stat static_stat, unmatched_stat;
};

/* lws's log callback has no context: the hub whose log lines it reads. */
static struct hub *log_hub;

void hub_http_add_routes(struct hub *hub, const struct hub_route *routes, size_t n, void *ctx)
{
	struct hub_http *h = hub->http;

	struct hub_route_stat *stats = hub_xcalloc(n, sizeof(*stats));

	for (size_t i = 0; i < n; i++) {
		stats[i].method = routes[i].method;
		stats[i].route = routes[i].pattern;
	}
	h->tables = hub_xrealloc(h->tables, (h->ntables + 1) * sizeof(*h->tables));
	h->tables[h->ntables++] = (struct route_table){ routes, n, ctx, stats };
}

void hub_http_each_route_stat(const struct hub *hub,
			      void (*fn)(const struct hub_route_stat *s, void *arg), void *arg)
{
	const struct hub_http *h = hub->http;

	if (!h)
		return;
	for (size_t t = 0; t < h->ntables; t++)
		for (size_t i = 0; i < h->tables[t].n; i++)
			fn(&h->tables[t].stats[i], arg);
	fn(&h->static_stat, arg);
	fn(&h->unmatched_stat, arg);
}

void hub_http_set_fallback(struct hub *hub, hub_route_fn fn, void *ctx)
{
	hub->http->fallback = fn;
	hub->http->fallback_ctx = ctx;
}

void hub_http_add_upgrade(struct hub *hub, const char *path, const char *subprotocol,
			  hub_upgrade_fn confirm, void *ctx)
{
	struct hub_http *h = hub->http;

	h->upgrades = hub_xrealloc(h->upgrades, (h->nupgrades + 1) * sizeof(*h->upgrades));
	h->upgrades[h->nupgrades++] = (struct upgrade){ path, subprotocol, confirm, ctx };
}

/* ---- the request ------------------------------------------------------------- */

#define HUB_REQ_EXTRA_MAX 256

struct hub_req {
	unsigned refs;
	struct lws *wsi;            /* NULL once the client has gone */
	struct hub *hub;
	auth_principal who;
	bool answered;              /* a response has been started */
	bool headers_pending;
	bool chunked, final, aborted;
	unsigned status;
	char ctype[64];
	struct hub_route_stat *stat; /* where its answer is counted */
	char peer[64];              /* the client's address */
	int64_t t0_us;              /* its head was complete */
	hub_buf out;                /* bytes not yet on the wire */
	hub_req_drained_cb drained;
	void *ctx;
	void (*ctx_free)(void *);
	char extra[HUB_REQ_EXTRA_MAX]; /* hub_req_add_header: "name: value\0" pairs */
	size_t extra_len;
};

/* Per request (lws frees and reallocates it for every keep-alive
 * transaction: HTTP_DROP_PROTOCOL is its end). */
struct http_pss {
	struct hub_http *h;
	struct lws *wsi;
	struct hub_req *rq;
	bool close_after;   /* close the connection once the answer is out */
	/* The route, and what its handler gets. */
	const struct hub_route *route;
	void *route_ctx;
	char path[256];     /* the path, its {} segments cut out in place */
	const char *param[HUB_ROUTE_PARAMS];
	hub_buf qmem;
	struct hub_query q;
	char idem[160];
	char method[8];
	/* The request body. */
	bool has_body;      /* Content-Length > 0 */
	bool body_seen, body_completed, body_timer;
	bool collecting, too_large;
	hub_buf reqbody;
	lws_sorted_usec_list_t sul_body;
	/* What goes to the socket (http_flush). */
	hub_buf wire;
	size_t off;
	int ssl_retry;      /* length of an SSL_write to repeat, 0 = none */
	bool flush_armed;
	lws_usec_t backoff_us;
	int64_t progress_us;
	lws_sorted_usec_list_t sul_flush;
};

static void json_error_field(hub_buf *b, const char *code, const char *field,
			     const char *message)
{
	hub_buf_puts(b, "{\"error\":{\"code\":");
	hub_buf_json_str(b, code, strlen(code));
	hub_buf_puts(b, ",\"message\":");
	hub_buf_json_str(b, message, strlen(message));
	if (field) {
		hub_buf_puts(b, ",\"field\":");
		hub_buf_json_str(b, field, strlen(field));
	}
	hub_buf_puts(b, "}}");
}

/* ---- writing answers ---------------------------------------------------------
 *
 * libwebsockets 4.1.6 spins on an HTTP/1.1 connection whose client sends
 * anything while a request is being answered (pipelining, or one stray
 * byte): it neither reads the bytes (POLLIN stays ready) nor stops offering
 * those it has buffered to itself, and the process sits at 100 % CPU for as
 * long as the answer takes (a throttled export: minutes). Only rx flow
 * control stops that, and with it on lws 4.1.6 never services POLLOUT for an
 * HTTP/1.1 connection. So a connection is not read from the moment its
 * request is complete until its answer is out (the next request is read
 * after that, exactly as HTTP/1.1 orders them), and answers bypass lws's
 * writer: http_flush() sends the bytes to the socket (or the TLS session)
 * itself, from a timer, and a send that would block is tried again with a
 * backoff of 1 to 64 ms. The end of an answer ends the transaction
 * (lws_http_transaction_completed, then reading resumes) or the connection. */

#define RETRY_MIN_US   1000
#define RETRY_MAX_US   (64 * 1000)

static void flush_cb(lws_sorted_usec_list_t *sul);

static void want_flush(struct http_pss *pss, lws_usec_t after_us)
{
	pss->flush_armed = true;
	lws_sul_schedule(pss->h->hub->ctx, 0, &pss->sul_flush, flush_cb, after_us);
}

/* Stops reading the connection until its answer is out. */
static void stop_reading(struct lws *wsi)
{
	lws_rx_flow_control(wsi, 0);
}

/* The response's status line and headers, into wire. */
static int build_head(struct http_pss *pss, const struct hub_req *rq, size_t len)
{
	uint8_t hdr[HEAD_ROOM], *p = hdr, *end = hdr + sizeof(hdr) - 1;
	struct lws *wsi = pss->wsi;

	if (rq->chunked) {
		if (lws_add_http_header_status(wsi, rq->status, &p, end) ||
		    lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_CONTENT_TYPE,
						 (const unsigned char *)rq->ctype,
						 (int)strlen(rq->ctype), &p, end) ||
		    lws_add_http_header_by_name(wsi, (const unsigned char *)"transfer-encoding:",
						(const unsigned char *)"chunked", 7, &p, end))
			return -1;
	} else if (lws_add_http_common_headers(wsi, rq->status, rq->ctype, len, &p, end)) {
		return -1;
	}
	if (lws_add_http_header_by_name(wsi, (const unsigned char *)"cache-control:",
					(const unsigned char *)"no-store", 8, &p, end) ||
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"x-content-type-options:",
					(const unsigned char *)"nosniff", 7, &p, end) ||
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"content-security-policy:",
					(const unsigned char *)CSP, sizeof(CSP) - 1, &p, end))
		return -1;
	if (rq->status == 401 &&
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"www-authenticate:",
					(const unsigned char *)WWW_AUTHENTICATE,
					sizeof(WWW_AUTHENTICATE) - 1, &p, end))
		return -1;
	for (size_t at = 0; at < rq->extra_len;) {
		const char *name = rq->extra + at, *val = name + strlen(name) + 1;
		if (lws_add_http_header_by_name(wsi, (const unsigned char *)name,
						(const unsigned char *)val, (int)strlen(val), &p, end))
			return -1;
		at = (size_t)(val - rq->extra) + strlen(val) + 1;
	}
	if (pss->close_after &&
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"connection:",
					(const unsigned char *)"close", 5, &p, end))
		return -1;
	if (lws_finalize_http_header(wsi, &p, end))
		return -1;
	hub_buf_append(&pss->wire, hdr, (size_t)(p - hdr));
	return 0;
}

/* Moves what the request has queued (its headers first) onto the wire. */
static void req_gather(struct http_pss *pss)
{
	struct hub_req *rq = pss->rq;

	if (!rq->answered)
		return;
	if (rq->headers_pending) {
		if (build_head(pss, rq, rq->out.len)) {
			rq->aborted = true;
			return;
		}
		rq->headers_pending = false;
	}
	if (rq->out.len) {
		hub_buf_append(&pss->wire, rq->out.data, rq->out.len);
		rq->out.len = 0;
		if (rq->out.cap > 4 * 1024 * 1024) /* give a big page's memory back */
			hub_buf_free(&rq->out);
	}
}

/* Sends what the socket takes of wire. Returns 1 when all of it is sent,
 * 0 when the socket is full, -1 when the connection failed. */
static int send_wire(struct lws *wsi, struct http_pss *pss)
{
	SSL *ssl = lws_get_ssl(wsi);
	int fd = lws_get_socket_fd(wsi);

	while (pss->off < pss->wire.len) {
		size_t left = pss->wire.len - pss->off;

		if (ssl) {
			/* A write that wanted to write is repeated with its length
			 * (lws sets SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER). */
			int n = pss->ssl_retry ? pss->ssl_retry : left > BODY_CHUNK ? BODY_CHUNK : (int)left;
			ERR_clear_error();
			int w = SSL_write(ssl, pss->wire.data + pss->off, n);
			if (w > 0) {
				pss->off += (size_t)w;
				pss->ssl_retry = 0;
				pss->h->hub->metrics.bytes_sent[HUB_WS__COUNT] += (uint64_t)w;
				continue;
			}
			if (SSL_get_error(ssl, w) == SSL_ERROR_WANT_WRITE) {
				pss->ssl_retry = n;
				return 0;
			}
			return -1;
		}
		ssize_t w = send(fd, pss->wire.data + pss->off, left, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w > 0) {
			pss->off += (size_t)w;
			pss->h->hub->metrics.bytes_sent[HUB_WS__COUNT] += (uint64_t)w;
			continue;
		}
		if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
			return 0;
		return -1;
	}
	return 1;
}

static void kill_conn(struct lws *wsi)
{
	lws_set_timeout(wsi, PENDING_TIMEOUT_HTTP_CONTENT, LWS_TO_KILL_ASYNC);
}

static void req_detach(struct http_pss *pss);

/* The answer is out: the next request (reading resumes) or the close it
 * announced. The pss is gone afterwards (lws frees it for the next
 * transaction). */
static void transaction_end(struct lws *wsi, struct http_pss *pss)
{
	bool close_after = pss->close_after;

	req_detach(pss);
	if (close_after || lws_http_transaction_completed(wsi)) {
		kill_conn(wsi);
		return;
	}
	lws_rx_flow_control(wsi, 1);
	lws_callback_on_writable(wsi); /* lws moves to reading on POLLOUT */
}

/* Sends the queued answer; called from its timer only. */
static void http_flush(struct http_pss *pss)
{
	struct lws *wsi = pss->wsi;
	struct hub_req *rq = pss->rq;
	int64_t now = hub_mono_us();
	size_t before = pss->off;
	int r;

	pss->flush_armed = false;
	if (!rq || rq->aborted) {
		kill_conn(wsi);
		return;
	}
	req_gather(pss);
	r = send_wire(wsi, pss);
	if (r < 0) {
		kill_conn(wsi);
		return;
	}
	if (!pss->progress_us) {
		/* lws 4.1.6 put a deadline of timeout_secs (the header
		 * timeout) on the request when it was routed and keeps it until
		 * the transaction completes, which would cut any answer that
		 * takes longer to send (a large export to a slow reader). From
		 * its first byte an answer's deadline is STREAM_IDLE_S without
		 * progress (below). */
		lws_set_timeout(wsi, NO_PENDING_TIMEOUT, 0);
	}
	if (pss->off != before || !pss->progress_us) {
		pss->progress_us = now;
		pss->backoff_us = RETRY_MIN_US;
	}
	if (!r) {
		/* The client reads slowly or not at all: try again later; a
		 * client that took nothing for STREAM_IDLE_S is let go. */
		if (now - pss->progress_us > (int64_t)STREAM_IDLE_S * 1000000) {
			kill_conn(wsi);
			return;
		}
		want_flush(pss, pss->backoff_us);
		if (pss->backoff_us < RETRY_MAX_US)
			pss->backoff_us *= 2;
		return;
	}
	pss->wire.len = pss->off = 0;
	if (pss->wire.cap > 4 * 1024 * 1024)
		hub_buf_free(&pss->wire); /* give a big page's memory back */
	if (rq->answered && rq->final) {
		transaction_end(wsi, pss);
	} else if (rq->answered && rq->drained) {
		hub_req_ref(rq);
		rq->drained(rq);   /* may queue more (hub_req_stream_write) */
		hub_req_unref(rq);
	}
}

static void flush_cb(lws_sorted_usec_list_t *sul)
{
	http_flush(lws_container_of(sul, struct http_pss, sul_flush));
}

/* ---- struct hub_req -------------------------------------------------------- */

static struct hub_req *req_new(struct lws *wsi, struct hub *hub)
{
	struct hub_req *rq = hub_xcalloc(1, sizeof(*rq));

	rq->refs = 1; /* the pss's */
	rq->wsi = wsi;
	rq->hub = hub;
	return rq;
}

const char *hub_query_get(const struct hub_query *q, const char *name)
{
	for (size_t i = 0; q && i < q->n; i++)
		if (!strcmp(q->name[i], name))
			return q->value[i];
	return NULL;
}

void hub_req_unavailable(struct hub_req *rq)
{
	hub_req_error(rq, 503, "unavailable", NULL, "Redis is unavailable; retry later");
}

void hub_req_redis_failed(struct hub_req *rq, const struct redisReply *r)
{
	if (!r)
		hub_req_unavailable(rq);
	else
		hub_req_error(rq, 500, "internal", NULL, "unexpected answer from Redis");
}

struct hub *hub_req_hub(const struct hub_req *rq) { return rq->hub; }
const auth_principal *hub_req_who(const struct hub_req *rq) { return &rq->who; }
const char *hub_req_peer(const struct hub_req *rq) { return rq->peer; }
void *hub_req_ctx(const struct hub_req *rq) { return rq->ctx; }

bool hub_req_gone(const struct hub_req *rq)
{
	return !rq->wsi || rq->aborted || (rq->answered && !rq->chunked) ||
	       (rq->chunked && rq->final);
}

int hub_req_add_header(struct hub_req *rq, const char *name, const char *value)
{
	size_t nl = strlen(name), vl = strlen(value);

	if (rq->answered || rq->extra_len + nl + vl + 2 > sizeof(rq->extra))
		return -1;
	memcpy(rq->extra + rq->extra_len, name, nl + 1);
	memcpy(rq->extra + rq->extra_len + nl + 1, value, vl + 1);
	rq->extra_len += nl + vl + 2;
	return 0;
}

void hub_req_set_ctx(struct hub_req *rq, void *ctx, void (*ctx_free)(void *))
{
	rq->ctx = ctx;
	rq->ctx_free = ctx_free;
}

void hub_req_ref(struct hub_req *rq)
{
	rq->refs++;
}

void hub_req_unref(struct hub_req *rq)
{
	if (!rq || --rq->refs)
		return;
	if (rq->ctx_free)
		rq->ctx_free(rq->ctx);
	auth_principal_clear(&rq->who);
	hub_buf_free(&rq->out);
	free(rq);
}

/* Counts the answer under its route: status, and the time to its head
 * (a stream's whole body comes later). */
static void req_observe(struct hub_req *rq)
{
	if (rq->stat)
		hub_route_stat_observe(rq->stat, rq->status,
				       (double)(hub_mono_us() - rq->t0_us) / 1e6);
}

static void req_kick(struct hub_req *rq)
{
	struct http_pss *pss = rq->wsi ? lws_wsi_user(rq->wsi) : NULL;

	if (pss && !pss->flush_armed)
		want_flush(pss, 0);
}

void hub_req_respond(struct hub_req *rq, unsigned status, const char *ctype,
		     const char *body, size_t len)
{
	if (rq->answered || !rq->wsi)
		return;
	rq->answered = true;
	rq->headers_pending = true;
	rq->final = true;
	rq->status = status;
	req_observe(rq);
	snprintf(rq->ctype, sizeof(rq->ctype), "%s", ctype);
	hub_buf_append(&rq->out, body, len);
	req_kick(rq);
}

void hub_req_error(struct hub_req *rq, unsigned status, const char *code,
		   const char *field, const char *message)
{
	hub_buf b = { 0 };

	json_error_field(&b, code, field, message);
	hub_req_respond(rq, status, "application/json", b.data, b.len);
	hub_buf_free(&b);
}

void hub_req_stream_begin(struct hub_req *rq, unsigned status, const char *ctype,
			  hub_req_drained_cb drained)
{
	if (rq->answered || !rq->wsi)
		return;
	rq->answered = true;
	rq->headers_pending = true;
	rq->chunked = true;
	rq->status = status;
	req_observe(rq);
	rq->drained = drained;
	snprintf(rq->ctype, sizeof(rq->ctype), "%s", ctype);
	req_kick(rq);
}

void hub_req_stream_write(struct hub_req *rq, const char *data, size_t len)
{
	if (!rq->chunked || rq->final || !rq->wsi)
		return;
	if (len) {
		hub_buf_printf(&rq->out, "%zx\r\n", len);
		hub_buf_append(&rq->out, data, len);
		hub_buf_puts(&rq->out, "\r\n");
	}
	req_kick(rq); /* even for nothing: drained then asks for more */
}

void hub_req_stream_end(struct hub_req *rq)
{
	if (!rq->chunked || rq->final || !rq->wsi)
		return;
	hub_buf_puts(&rq->out, "0\r\n\r\n");
	rq->final = true;
	req_kick(rq);
}

void hub_req_abort(struct hub_req *rq)
{
	rq->aborted = true;
	req_kick(rq);
}

/* The request's connection is done with it: it can send nothing more. */
static void req_detach(struct http_pss *pss)
{
	struct hub_req *rq = pss ? pss->rq : NULL;

	if (!rq)
		return;
	pss->rq = NULL;
	rq->wsi = NULL;
	hub_req_unref(rq);
}

/* ---- credentials ------------------------------------------------------------- */

enum hub_bearer hub_http_bearer(struct lws *wsi, char *buf, size_t size, const char **cred,
				size_t *len)
{
	int n = lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_AUTHORIZATION);
	const char *p;

	if (n <= 0)
		return HUB_BEARER_NONE;
	if (n > HUB_AUTHZ_MAX + 7 + 8 ||
	    lws_hdr_copy(wsi, buf, (int)size, WSI_TOKEN_HTTP_AUTHORIZATION) < 0)
		return HUB_BEARER_TOO_LONG;
	if (strncasecmp(buf, "Bearer ", 7))
		return HUB_BEARER_BAD;
	for (p = buf + 7; *p == ' '; p++)
		;
	*cred = p;
	*len = strlen(p);
	if (!*len)
		return HUB_BEARER_BAD;
	return *len > HUB_AUTHZ_MAX ? HUB_BEARER_TOO_LONG : HUB_BEARER_OK;
}

const char *hub_http_bearer_problem(enum hub_bearer b)
{
	return b == HUB_BEARER_NONE ? "missing credentials (Authorization: Bearer <key or token>)" :
	       b == HUB_BEARER_TOO_LONG ? "credentials longer than 8192 bytes" :
	       "expected Authorization: Bearer <key or token>";
}

/* The route's API key check: 0 with rq->who set, or an answer (401/403)
 * queued and -1. */
static int authorize(struct http_pss *pss, const struct hub_route *route)
{
	char authz[HUB_AUTHZ_MAX + 16];
	const char *cred;
	size_t clen;
	struct hub *hub = pss->h->hub;
	struct hub_req *rq = pss->rq;
	enum hub_bearer b = hub_http_bearer(pss->wsi, authz, sizeof(authz), &cred, &clen);

	if (b != HUB_BEARER_OK || auth_check_api_key(hub->auth, cred, clen, &rq->who) != AUTH_OK) {
		hub->metrics.api_auth_failures_total++;
		hub_req_error(rq, 401, "unauthorized", NULL,
			      b != HUB_BEARER_OK ? hub_http_bearer_problem(b) : "unknown API key");
		return -1;
	}
	if (route->scopes && !auth_has_scope(&rq->who, AUTH_SCOPE_ADMIN) &&
	    !(rq->who.scopes & route->scopes)) {
		hub_req_error(rq, 403, "forbidden", NULL,
			      route->scopes == AUTH_SCOPE_COMMANDS_WRITE ?
			      "this API key lacks the commands:write scope" :
			      "this API key lacks the scope this route needs");
		return -1;
	}
	return 0;
}

/* ---- routing ---------------------------------------------------------------- */

/* Collects the URI arguments (lws URL-decodes them) into q, their bytes into
 * mem. Returns 0, or -1 when there are more than HUB_QUERY_MAX. */
static int collect_query(struct lws *wsi, struct hub_query *q, hub_buf *mem)
{
	int total = lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_URI_ARGS);
	size_t offs[HUB_QUERY_MAX];

	q->n = 0;
	if (total <= 0)
		return 0;
	hub_buf_reserve(mem, (size_t)total + 2 * HUB_QUERY_MAX + 2);
	for (int i = 0;; i++) {
		int flen = lws_hdr_fragment_length(wsi, WSI_TOKEN_HTTP_URI_ARGS, i);
		if (flen <= 0)
			break;
		if (q->n == HUB_QUERY_MAX)
			return -1;
		hub_buf_reserve(mem, (size_t)flen + 2);
		int n = lws_hdr_copy_fragment(wsi, mem->data + mem->len, flen + 1,
					      WSI_TOKEN_HTTP_URI_ARGS, i);
		if (n < 0)
			break;
		offs[q->n++] = mem->len;
		mem->len += (size_t)n + 1;
	}
	/* Pointers only after the last reallocation. */
	for (size_t i = 0; i < q->n; i++) {
		char *s = mem->data + offs[i], *eq = strchr(s, '=');
		q->name[i] = s;
		q->value[i] = "";
		if (eq) {
			*eq = '\0';
			q->value[i] = eq + 1;
		}
	}
	return 0;
}

/* Matches path against pattern ("{}" = one non-empty segment); the
 * segments matched by {} are written to params as offsets into path. */
static bool match(const char *pattern, const char *path, size_t params[][2], size_t *np)
{
	const char *p = pattern, *s = path;

	*np = 0;
	while (*p && *s) {
		if (p[0] == '{' && p[1] == '}') {
			const char *e = strchr(s, '/');
			size_t n = e ? (size_t)(e - s) : strlen(s);
			if (!n || *np == HUB_ROUTE_PARAMS)
				return false;
			params[*np][0] = (size_t)(s - path);
			params[(*np)++][1] = n;
			s += n;
			p += 2;
		} else if (*p++ != *s++) {
			return false;
		}
	}
	return !*p && !*s;
}

/* Adds method to allow ("GET, PUT"), once. */
static void allow_add(char *allow, size_t n, const char *method)
{
	size_t ml = strlen(method), al = strlen(allow);

	for (const char *p = allow; (p = strstr(p, method)); p += ml)
		if ((p == allow || p[-1] == ' ') && (!p[ml] || p[ml] == ','))
			return;
	if (al + ml + 3 < n)
		snprintf(allow + al, n - al, "%s%s", al ? ", " : "", method);
}

/* The route for method and path, with its table's ctx; NULL when none.
 * allow gets the methods the path's routes take (for a 405's Allow). */
static const struct hub_route *find_route(const struct hub_http *h, const char *method,
					  const char *path,
					  void **ctx, size_t params[][2], size_t *np,
					  char *allow, size_t allowlen, struct hub_route_stat **stat)
{
	allow[0] = '\0';
	for (size_t t = 0; t < h->ntables; t++) {
		for (size_t i = 0; i < h->tables[t].n; i++) {
			const struct hub_route *r = &h->tables[t].routes[i];
			if (!match(r->pattern, path, params, np))
				continue;
			if (strcmp(r->method, method)) {
				allow_add(allow, allowlen, r->method);
				continue;
			}
			*ctx = h->tables[t].ctx;
			*stat = &h->tables[t].stats[i];
			return r;
		}
	}
	return NULL;
}

/* Calls the route's handler (its body, if any, is complete). */
static void dispatch(struct http_pss *pss)
{
	struct hub_req *rq = pss->rq;
	struct hub_route_args a = {
		{ pss->param[0], pss->param[1] }, &pss->q,
		pss->reqbody.data ? pss->reqbody.data : "", pss->reqbody.len,
		pss->idem[0] ? pss->idem : NULL, pss->route_ctx,
	};

	hub_req_ref(rq);
	if (pss->too_large)
		hub_req_error(rq, 413, "too_large", NULL, "request bodies are limited to 64 KiB");
	else
		pss->route->fn(rq, &a);
	hub_req_unref(rq);
}

/* Routes a complete request head: 404/405, the key, the query; a POST then
 * waits for its body (on_body_completion), anything else runs now. */
static void route(struct http_pss *pss, const char *path)
{
	struct hub_req *rq = pss->rq;
	size_t params[HUB_ROUTE_PARAMS][2], np;
	char allow[64];
	const struct hub_route *r;

	if (strlen(path) >= sizeof(pss->path)) {
		hub_req_error(rq, 404, "not_found", NULL, "no such route");
		return;
	}
	snprintf(pss->path, sizeof(pss->path), "%s", path);
	r = find_route(pss->h, pss->method, path, &pss->route_ctx, params, &np, allow,
		       sizeof(allow), &rq->stat);
	if (!r) {
		if (allow[0]) {
			hub_req_add_header(rq, "allow:", allow);
			hub_req_error(rq, 405, "method_not_allowed", NULL,
				      "this route does not take that method (see Allow)");
		}
		else if (pss->h->fallback && !strcmp(pss->method, "GET")) {
			struct hub_route_args a = { { path, NULL }, NULL, "", 0, NULL,
						    pss->h->fallback_ctx };
			rq->stat = &pss->h->static_stat;
			pss->h->fallback(rq, &a);
		} else
			hub_req_error(rq, 404, "not_found", NULL, "no such route");
		return;
	}
	for (size_t i = 0; i < np; i++) {
		pss->path[params[i][0] + params[i][1]] = '\0';
		pss->param[i] = pss->path + params[i][0];
	}
	pss->route = r;
	if (r->auth == HUB_ROUTE_KEY && authorize(pss, r))
		return;
	if (collect_query(pss->wsi, &pss->q, &pss->qmem)) {
		hub_req_error(rq, 422, "invalid", "query", "too many query parameters");
		return;
	}
	if (lws_hdr_custom_copy(pss->wsi, pss->idem, sizeof(pss->idem), "idempotency-key:", 16) < 0)
		pss->idem[0] = '\0';
	if (!strcmp(pss->method, "POST") || !strcmp(pss->method, "PUT")) {
		pss->collecting = true;
		/* With a Content-Length the body follows (on_body_completion);
		 * without one it is empty (RFC 9112 6.3) and lws reports no
		 * completion: answer now. */
		if (pss->has_body)
			return;
		pss->collecting = false;
	}
	dispatch(pss);
}

/* ---- the request's life -------------------------------------------------------
 *
 * lws 4.1.6 mishandles a request that carries a body when its bytes were
 * already buffered behind an earlier request on the connection (pipelined):
 * after the HTTP callback it feeds the buffered request to itself again as
 * its own body, then loops forever calling HTTP_BODY_COMPLETION without
 * consuming anything (the process spins and never sees a signal). The first
 * "body" bytes it hands over are then the request's own request line. So a
 * body whose first bytes are the request's method and a space closes the
 * connection (no JSON body the API takes starts that way), and so does a
 * second completion of the same body. Nothing is written before that,
 * because answers go out from a timer (http_flush): the client sees every
 * earlier answer complete, then the close. A request with a body is the
 * last its connection serves. docs/protocol.md lists the limits. */

static const struct {
	enum lws_token_indexes tok;
	const char *name;
} methods[] = {
	{ WSI_TOKEN_GET_URI, "GET" }, { WSI_TOKEN_POST_URI, "POST" },
	{ WSI_TOKEN_PUT_URI, "PUT" }, { WSI_TOKEN_PATCH_URI, "PATCH" },
	{ WSI_TOKEN_DELETE_URI, "DELETE" }, { WSI_TOKEN_OPTIONS_URI, "OPTIONS" },
	{ WSI_TOKEN_HEAD_URI, "HEAD" },
};

/* The length of the request's path, or 0 when lws saw no method. */
static int request_method(struct lws *wsi, char out[8])
{
	for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++) {
		int n = lws_hdr_total_length(wsi, methods[i].tok);
		if (n > 0) {
			snprintf(out, 8, "%s", methods[i].name);
			return n;
		}
	}
	out[0] = '\0';
	return 0;
}

/* True if the first body bytes are this request's own request line. */
static bool body_is_request_line(const char *in, size_t len, const char *method)
{
	size_t ml = strlen(method), n;

	while (len && (*in == '\r' || *in == '\n' || *in == ' ' || *in == '\t')) {
		in++;
		len--;
	}
	if (!ml || !len)
		return false;
	n = len < ml + 1 ? len : ml + 1;
	return !memcmp(in, method, n < ml ? n : ml) && (n <= ml || in[ml] == ' ');
}

static void body_deadline(lws_sorted_usec_list_t *sul)
{
	struct http_pss *pss = lws_container_of(sul, struct http_pss, sul_body);
	struct hub *hub = pss->h->hub;

	pss->body_timer = false;
	hub->metrics.http_refused[HUB_HTTP_BODY_TIMEOUT]++;
	hub_info("http: request body not complete within %d s: closing",
		 hub->cfg.http_body_timeout_s);
	kill_conn(pss->wsi);
}

/* Frees what the request holds; called when lws drops the request (its
 * transaction ended, or the connection closed). Idempotent. */
static void pss_release(struct http_pss *pss)
{
	if (pss->body_timer) {
		lws_sul_cancel(&pss->sul_body);
		pss->body_timer = false;
	}
	lws_sul_cancel(&pss->sul_flush);
	pss->flush_armed = false;
	hub_buf_free(&pss->wire);
	hub_buf_free(&pss->reqbody);
	hub_buf_free(&pss->qmem);
	req_detach(pss);
}

static unsigned long long content_length(struct lws *wsi, bool *bad)
{
	char v[32], *end;
	unsigned long long n;
	int l = lws_hdr_copy(wsi, v, sizeof(v), WSI_TOKEN_HTTP_CONTENT_LENGTH);

	*bad = false;
	if (l == 0)
		return 0;
	errno = 0;
	n = strtoull(v, &end, 10);
	if (l < 0 || end == v || *end || errno || v[0] == '-') {
		*bad = true;
		return 0;
	}
	return n;
}

/* A request's head has arrived: answers what no route accepts (the
 * connection closes after such an answer), then routes it. */
static void on_request(struct lws *wsi, struct hub *hub, struct http_pss *pss,
		       const char *path)
{
	bool bad_length;
	unsigned long long clen;
	int plen;

	pss->h = hub->http;
	pss->wsi = wsi;
	pss->rq = req_new(wsi, hub);
	pss->rq->stat = &pss->h->unmatched_stat;
	pss->rq->t0_us = hub_mono_us();
	lws_get_peer_simple(wsi, pss->rq->peer, sizeof(pss->rq->peer));
	plen = request_method(wsi, pss->method);
	clen = content_length(wsi, &bad_length);
	if (!clen)
		stop_reading(wsi); /* complete: not read until answered (above) */
	else
		pss->has_body = true;
	pss->close_after = pss->has_body || bad_length;
	if (plen > HUB_HTTP_URI_MAX ||
	    lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_URI_ARGS) > HUB_HTTP_URI_MAX) {
		hub->metrics.http_refused[HUB_HTTP_URI_TOO_LONG]++;
		pss->close_after = true;
		hub_req_error(pss->rq, 414, "uri_too_long", NULL,
			      "the URL path and the query are limited to 4096 bytes each");
	} else if (lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_TRANSFER_ENCODING) > 0) {
		/* lws 4.1.6 does not deliver chunked request bodies (it would
		 * read them as the next request): ask for a Content-Length
		 * (RFC 9110 15.5.12) and close. */
		hub->metrics.http_refused[HUB_HTTP_CHUNKED_BODY]++;
		pss->close_after = true;
		hub_req_error(pss->rq, 411, "length_required", NULL,
			      "send the body with a Content-Length (chunked bodies are not supported)");
	} else if (bad_length) {
		hub_req_error(pss->rq, 400, "bad_request", NULL, "malformed Content-Length");
	} else if (clen > HUB_HTTP_BODY_MAX) {
		hub->metrics.http_refused[HUB_HTTP_BODY_TOO_LARGE]++;
		hub_req_error(pss->rq, 413, "too_large", NULL, "request bodies are limited to 64 KiB");
	} else if (clen && strcmp(pss->method, "POST") && strcmp(pss->method, "PUT")) {
		hub_req_error(pss->rq, 400, "bad_request", NULL,
			      "only POST requests may carry a body here");
	} else {
		if (clen) {
			/* A request with a body is the last on its connection:
			 * lws 4.1.6 cannot be trusted with what follows a body. */
			pss->body_timer = true;
			lws_sul_schedule(hub->ctx, 0, &pss->sul_body, body_deadline,
					 (lws_usec_t)hub->cfg.http_body_timeout_s * LWS_US_PER_SEC);
		}
		route(pss, path);
	}
}

static int on_body(struct http_pss *pss, const char *in, size_t len)
{
	if (!pss->body_seen) {
		pss->body_seen = true;
		if (in && body_is_request_line(in, len, pss->method)) {
			pss->h->hub->metrics.http_refused[HUB_HTTP_PIPELINE_CLOSED]++;
			hub_info("http: a pipelined request with a body: closing the connection");
			return -1;
		}
	}
	pss->h->hub->metrics.bytes_received[HUB_WS__COUNT] += len;
	if (pss->collecting && !pss->too_large && in && len) {
		if (pss->reqbody.len + len > HUB_HTTP_BODY_MAX)
			pss->too_large = true;
		else
			hub_buf_append(&pss->reqbody, in, len);
	}
	return 0;
}

static int on_body_completion(struct lws *wsi, struct http_pss *pss)
{
	if (pss->body_completed) {
		/* lws's loop over a pipelined body (above): never act twice. */
		pss->h->hub->metrics.http_refused[HUB_HTTP_PIPELINE_CLOSED]++;
		return -1;
	}
	pss->body_completed = true;
	if (pss->body_timer) {
		lws_sul_cancel(&pss->sul_body);
		pss->body_timer = false;
	}
	/* The request is complete: not read again until it is answered (lws
	 * would also hand bytes read behind the body to this completion again
	 * and again). */
	stop_reading(wsi);
	if (pss->collecting && pss->rq) {
		pss->collecting = false;
		dispatch(pss);
	}
	return 0;
}

/* ---- WebSocket upgrades --------------------------------------------------------- */

static const char *status_text(unsigned status)
{
	switch (status) {
	case 400: return "Bad Request";
	case 401: return "Unauthorized";
	case 403: return "Forbidden";
	case 404: return "Not Found";
	default: return "Error";
	}
}

/* From CONFIRM_UPGRADE, the one place lws 4.1.6 lets a refused upgrade
 * answer at all (returning non-zero from FILTER_PROTOCOL_CONNECTION only
 * drops the TCP connection). lws would write the status line as HTTP/1.0
 * here (it learns the request's version only for requests that are not
 * upgrades), which WebSocket clients reject as a bad response: the status
 * line is written by hand. */
int hub_http_refuse_upgrade(struct lws *wsi, unsigned status, const char *code,
			    const char *message)
{
	uint8_t buf[LWS_PRE + 1024], *start = buf + LWS_PRE, *p = start,
		*end = buf + sizeof(buf) - 1;
	hub_buf body = { 0 };
	char clen[24];
	int n;

	json_error_field(&body, code, NULL, message);
	n = snprintf((char *)p, (size_t)(end - p), "HTTP/1.1 %u %s\r\n", status,
		     status_text(status));
	p += n;
	n = snprintf(clen, sizeof(clen), "%zu", body.len);
	if (lws_add_http_header_by_name(wsi, (const unsigned char *)"content-type:",
					(const unsigned char *)"application/json", 16, &p, end) ||
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"content-length:",
					(const unsigned char *)clen, n, &p, end) ||
	    (status == 401 &&
	     lws_add_http_header_by_name(wsi, (const unsigned char *)"www-authenticate:",
					 (const unsigned char *)WWW_AUTHENTICATE,
					 sizeof(WWW_AUTHENTICATE) - 1, &p, end)) ||
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"connection:",
					(const unsigned char *)"close", 5, &p, end) ||
	    lws_finalize_http_header(wsi, &p, end) ||
	    (size_t)(end - p) < body.len)
		goto out;
	memcpy(p, body.data, body.len);
	p += body.len;
	lws_write(wsi, start, (size_t)(p - start), LWS_WRITE_HTTP_HEADERS);
out:
	hub_buf_free(&body);
	return 1;
}

/* The subprotocol lws will bind: the first name in the client's list that
 * names any protocol of the vhost, internal ones included (lws 4.1.6 picks
 * it exactly so, with these tokenizer flags). The upgrade is confirmed only
 * when that is the endpoint's own protocol, so a list such as
 * "http, iot-dashboard.v1" cannot bind the HTTP handler (which would hold
 * the connection with no deadline). */
static bool protocol_selected(struct lws *wsi, const char *want)
{
	char list[512], name[64];
	struct lws_tokenize ts;
	int n = lws_hdr_copy(wsi, list, sizeof(list), WSI_TOKEN_PROTOCOL);

	if (n <= 0)
		return false;
	lws_tokenize_init(&ts, list, LWS_TOKENIZE_F_COMMA_SEP_LIST |
				     LWS_TOKENIZE_F_MINUS_NONTERM |
				     LWS_TOKENIZE_F_DOT_NONTERM |
				     LWS_TOKENIZE_F_RFC7230_DELIMS);
	ts.len = (size_t)n;
	for (;;) {
		lws_tokenize_elem e = lws_tokenize(&ts);
		if (e == LWS_TOKZE_TOKEN) {
			if (lws_tokenize_cstr(&ts, name, sizeof(name)))
				return false; /* lws refuses a name this long */
			if (lws_vhost_name_to_protocol(lws_get_vhost(wsi), name))
				return !strcmp(name, want);
		} else if (e != LWS_TOKZE_DELIMITER) {
			return false; /* the end, or a list lws calls malformed */
		}
	}
}

/* What confirm accepted, kept on the wsi until the protocol's ESTABLISHED
 * takes it (or the connection goes). */
struct handshake {
	const struct upgrade *up;
	struct hub_handshake hs;
};

static void free_handshake(struct lws *wsi)
{
	struct handshake *h = lws_get_opaque_user_data(wsi);

	if (h) {
		lws_set_opaque_user_data(wsi, NULL);
		auth_principal_clear(&h->hs.who);
		free(h);
	}
}

bool hub_http_take_handshake(struct lws *wsi, const char *path, struct hub_handshake *out)
{
	struct handshake *h = lws_get_opaque_user_data(wsi);

	if (!h || strcmp(h->up->path, path))
		return false;
	lws_set_opaque_user_data(wsi, NULL);
	*out = h->hs; /* moves the principal */
	free(h);
	return true;
}

static int confirm_upgrade(struct lws *wsi, struct hub *hub, const char *kind)
{
	const struct hub_http *h = hub->http;
	char uri[128];
	const struct upgrade *up = NULL;

	if (!kind || strcmp(kind, "websocket"))
		return hub_http_refuse_upgrade(wsi, 400, "bad_request", "only WebSocket upgrades");
	if (lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) <= 0)
		return hub_http_refuse_upgrade(wsi, 400, "bad_request", "upgrade needs a GET");
	if (lws_hdr_copy(wsi, uri, sizeof(uri), WSI_TOKEN_GET_URI) >= 0)
		for (size_t i = 0; i < h->nupgrades && !up; i++)
			if (!strcmp(uri, h->upgrades[i].path))
				up = &h->upgrades[i];
	if (!up)
		return hub_http_refuse_upgrade(wsi, 404, "not_found", "no WebSocket endpoint at this path");
	if (!protocol_selected(wsi, up->subprotocol)) {
		char msg[160];
		snprintf(msg, sizeof(msg), "this endpoint needs subprotocol %s (first among the "
			 "names this hub serves)", up->subprotocol);
		return hub_http_refuse_upgrade(wsi, 400, "bad_subprotocol", msg);
	}
	struct handshake *hs = hub_xcalloc(1, sizeof(*hs));
	int rc = up->confirm(wsi, hub, &hs->hs, up->ctx);
	if (rc) {
		auth_principal_clear(&hs->hs.who);
		free(hs);
		return rc;
	}
	hs->up = up;
	free_handshake(wsi);
	lws_set_opaque_user_data(wsi, hs);
	return 0;
}

/* ---- requests whose headers lws could not hold ------------------------------
 * A request line and headers over HUB_HTTP_HEADER_MAX make lws 4.1.6 log an
 * error and close the connection with no status and no callback. Its log
 * line is the only sign: hub_http_lws_log() sees it and arms a 431 that the
 * socket shutdown following on the same call stack writes first
 * (hub/lws_quirks.c). */

int hub_http_lws_log(const char *line)
{
	if (strstr(line, "Ran out of header data space") ||
	    strstr(line, "More hdr frags than we can deal with")) {
		char msg[384], body[160];
		int bl, n;

		bl = snprintf(body, sizeof(body), "{\"error\":{\"code\":\"headers_too_large\","
			      "\"message\":\"the request line and headers are limited to %d bytes\"}}",
			      HUB_HTTP_HEADER_MAX);
		n = snprintf(msg, sizeof(msg), "HTTP/1.1 431 Request Header Fields Too Large\r\n"
			     "content-type: application/json\r\ncontent-length: %d\r\n"
			     "connection: close\r\n\r\n%s", bl, body);
		hub_quirk_answer_next_close(msg, (size_t)n);
		if (log_hub)
			log_hub->metrics.http_refused[HUB_HTTP_HEADERS_TOO_LARGE]++;
		hub_info("http: request line and headers over %d bytes: 431", HUB_HTTP_HEADER_MAX);
		return 1;
	}
	/* a URL token over its limit: answered 414 by on_request */
	return strstr(line, "exceeds limit") != NULL;
}


/* ---- the protocol ------------------------------------------------------------ */

static int http_callback(struct lws *wsi, enum lws_callback_reasons reason,
			 void *user, void *in, size_t len)
{
	struct lws_context *ctx = lws_get_context(wsi);
	struct hub *hub = ctx ? lws_context_user(ctx) : NULL;
	const struct lws_protocols *bound = lws_get_protocol(wsi);
	/* lws also sends some callbacks (WSI_DESTROY of an upgraded connection)
	 * here with another protocol's session data: only ours is an http_pss. */
	struct http_pss *pss = bound && bound->callback == http_callback ? user : NULL;

	switch (reason) {
	case LWS_CALLBACK_EVENT_WAIT_CANCELLED:
		/* A signal handler woke the loop: act on it from a timer. */
		if (hub && (hub->sig_term || hub->sig_hup))
			lws_sul_schedule(hub->ctx, 0, &hub->sul_signal,
					 hub->sul_signal.cb, 1);
		return 0;
	case LWS_CALLBACK_OPENSSL_PERFORM_CLIENT_CERT_VERIFICATION:
		/* `len` carries OpenSSL's preverify_ok; our return replaces it
		 * (the default handler accepts foreign certificates). */
		return len ? 0 : 1;
	case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
		return hub ? confirm_upgrade(wsi, hub, in) : -1;
	case LWS_CALLBACK_HTTP:
		if (!pss)
			return -1;
		on_request(wsi, hub, pss, (const char *)in);
		return 0;
	case LWS_CALLBACK_HTTP_BODY:
		return pss ? on_body(pss, in, len) : 0;
	case LWS_CALLBACK_HTTP_BODY_COMPLETION:
		return pss ? on_body_completion(wsi, pss) : 0;
	case LWS_CALLBACK_HTTP_WRITEABLE:
		return 0; /* answers are sent by http_flush */
	case LWS_CALLBACK_HTTP_DROP_PROTOCOL:
	case LWS_CALLBACK_CLOSED_HTTP:
		if (pss)
			pss_release(pss);
		break;
	case LWS_CALLBACK_WSI_DESTROY:
		free_handshake(wsi);
		if (pss)
			pss_release(pss);
		break;
	default:
		break;
	}
	return lws_callback_http_dummy(wsi, reason, user, in, len);
}

/* ---- the module ------------------------------------------------------------- */

static void http_protocol(const struct hub *hub, struct lws_protocols *out)
{
	(void)hub;
	*out = (struct lws_protocols){ "http", http_callback, sizeof(struct http_pss), 0, 0,
				       NULL, 0 };
}

static int http_start(struct hub *hub, char *err, size_t errlen)
{
	(void)err;
	(void)errlen;
	hub->http = hub_xcalloc(1, sizeof(*hub->http));
	hub->http->hub = hub;
	hub->http->static_stat = (struct hub_route_stat){ .method = "GET", .route = "(static)" };
	hub->http->unmatched_stat = (struct hub_route_stat){ .method = "any", .route = "(none)" };
	log_hub = hub;
	return 0;
}

static void http_free(struct hub *hub)
{
	if (!hub->http)
		return;
	for (size_t t = 0; t < hub->http->ntables; t++)
		free(hub->http->tables[t].stats);
	free(hub->http->tables);
	free(hub->http->upgrades);
	free(hub->http);
	hub->http = NULL;
	log_hub = NULL;
}

const struct hub_module hub_http_module = {
	.name = "http",
	.protocol = http_protocol,
	.start = http_start,
	.free = http_free,
};
