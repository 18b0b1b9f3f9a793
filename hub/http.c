#include "hub/http.h"

#include <errno.h>
#include <sys/socket.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hub/api.h"
#include "commands/cmd_api.h"
#include "hub/hub.h"
#include "hub/log.h"
#include "hub/lws_quirks.h"
#include "hub/redis.h"
#include "hub/util.h"
#include "protocols/gateway.h"
#include "protocols/stream.h"

#define BODY_CHUNK 16384

/* A streamed response whose client stops reading is closed after this long
 * without progress. */
#define STREAM_IDLE_S 60

#define MAX_REQUEST_BODY (64 * 1024)

/* What a refused upgrade and an early error write before closing. */
#define CSP_HEADER_ROOM 1024

/* docs/openapi.json, embedded at build time (cmake/embed.cmake). */
extern const unsigned char hub_openapi_json[];
extern const size_t hub_openapi_json_len;

/* Per request (lws frees and reallocates it for every keep-alive
 * transaction: HTTP_DROP_PROTOCOL is its end). */
struct http_pss {
	struct lws *wsi;
	/* A synchronous response: status, type and body are set by respond();
	 * the headers and the body are written on HTTP_WRITEABLE only. */
	hub_buf body;   /* LWS_PRE headroom, then the body */
	unsigned status;
	const char *ctype;
	bool resp_pending;  /* a synchronous answer is in `wire` */
	bool close_after;   /* close the connection once the response is out */
	/* What goes to the socket (http_flush). */
	hub_buf wire;
	size_t off;
	int ssl_retry;      /* length of an SSL_write to repeat, 0 = none */
	bool flush_armed;
	lws_usec_t backoff_us;
	int64_t progress_us;
	lws_sorted_usec_list_t sul_flush;
	struct hub_req *rq; /* an asynchronous API request (hub/api.h) */
	/* The request body. */
	char method[8];
	bool has_body;      /* Content-Length > 0 */
	bool body_seen, body_completed, body_timer;
	bool paused;        /* not read since the body's end (on_body_completion) */
	lws_sorted_usec_list_t sul_body;
	/* A POST waiting for its body (commands API). */
	bool collecting, too_large;
	hub_buf reqbody;
	hub_buf qmem;
	struct hub_query q;
	char path[256];
	char idem[160];
};

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
	hub_buf out;                /* LWS_PRE headroom, then bytes not yet queued */
	hub_req_drained_cb drained;
	void *ctx;
	void (*ctx_free)(void *);
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

static void json_error(hub_buf *b, const char *code, const char *message)
{
	json_error_field(b, code, NULL, message);
}

static void body_init(hub_buf *b)
{
	hub_buf_reserve(b, LWS_PRE + 256);
	memset(b->data, 0, LWS_PRE);
	b->len = LWS_PRE;
}

/* The dashboard (web/) loads only its own files and talks only to this hub. */
#define CSP "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; frame-ancestors 'none'"
#define WWW_AUTHENTICATE "Bearer realm=\"iot-hub\""

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
	struct hub *hub = lws_context_user(lws_get_context(pss->wsi));

	pss->flush_armed = true;
	lws_sul_schedule(hub->ctx, 0, &pss->sul_flush, flush_cb, after_us);
}

/* Stops reading the connection until its answer is out. */
static void stop_reading(struct lws *wsi)
{
	lws_rx_flow_control(wsi, 0);
}

/* The response's status line and headers, into wire. */
static int build_head(struct lws *wsi, struct http_pss *pss, unsigned status, const char *ctype,
		      size_t len, bool chunked)
{
	uint8_t hdr[CSP_HEADER_ROOM + 256], *p = hdr, *end = hdr + sizeof(hdr) - 1;

	if (chunked) {
		if (lws_add_http_header_status(wsi, status, &p, end) ||
		    lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_CONTENT_TYPE,
						 (const unsigned char *)ctype, (int)strlen(ctype),
						 &p, end) ||
		    lws_add_http_header_by_name(wsi, (const unsigned char *)"transfer-encoding:",
						(const unsigned char *)"chunked", 7, &p, end))
			return -1;
	} else if (lws_add_http_common_headers(wsi, status, ctype, len, &p, end)) {
		return -1;
	}
	if (lws_add_http_header_by_name(wsi, (const unsigned char *)"cache-control:",
					(const unsigned char *)"no-store", 8, &p, end) ||
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"x-content-type-options:",
					(const unsigned char *)"nosniff", 7, &p, end) ||
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"content-security-policy:",
					(const unsigned char *)CSP, sizeof(CSP) - 1, &p, end))
		return -1;
	if (status == 401 &&
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"www-authenticate:",
					(const unsigned char *)WWW_AUTHENTICATE,
					sizeof(WWW_AUTHENTICATE) - 1, &p, end))
		return -1;
	if (pss->close_after &&
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"connection:",
					(const unsigned char *)"close", 5, &p, end))
		return -1;
	if (lws_finalize_http_header(wsi, &p, end))
		return -1;
	hub_buf_append(&pss->wire, hdr, (size_t)(p - hdr));
	return 0;
}

/* Queues a synchronous answer: headers and body go to the socket from the
 * next flush (never from the HTTP callback itself, so a request that lws
 * then refuses, a pipelined body below, has written nothing). */
static int respond(struct lws *wsi, struct http_pss *pss, unsigned status,
		   const char *ctype)
{
	size_t blen = pss->body.len - LWS_PRE;

	pss->status = status;
	pss->ctype = ctype;
	if (build_head(wsi, pss, status, ctype, blen, false))
		return -1;
	hub_buf_append(&pss->wire, pss->body.data + LWS_PRE, blen);
	hub_buf_free(&pss->body);
	pss->resp_pending = true;
	want_flush(pss, 0);
	return 0;
}

static int respond_error(struct lws *wsi, struct http_pss *pss, unsigned status,
			 const char *code, const char *message)
{
	body_init(&pss->body);
	json_error(&pss->body, code, message);
	return respond(wsi, pss, status, "application/json");
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

/* The answer is out: the next request (reading resumes) or the close it
 * announced. The pss is gone afterwards (lws frees it for the next
 * transaction). */
static void transaction_end(struct lws *wsi, struct http_pss *pss)
{
	if (pss->close_after || lws_http_transaction_completed(wsi)) {
		kill_conn(wsi);
		return;
	}
	lws_rx_flow_control(wsi, 1);
	lws_callback_on_writable(wsi); /* lws moves to reading on POLLOUT */
}

static void req_gather(struct http_pss *pss);
static void req_detach(struct http_pss *pss);

/* Sends the queued answer; called from its timer only. */
static void http_flush(struct http_pss *pss)
{
	struct lws *wsi = pss->wsi;
	struct hub_req *rq = pss->rq;
	int64_t now = hub_mono_us();
	int r;

	pss->flush_armed = false;
	if (rq && rq->aborted) {
		kill_conn(wsi);
		return;
	}
	if (rq)
		req_gather(pss);
	size_t before = pss->off;
	r = send_wire(wsi, pss);
	if (r < 0) {
		kill_conn(wsi);
		return;
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
	if (rq) {
		if (rq->answered && rq->final) {
			req_detach(pss);
			transaction_end(wsi, pss);
		} else if (rq->answered && rq->drained) {
			hub_req_ref(rq);
			rq->drained(rq);   /* may queue more (hub_req_stream_write) */
			hub_req_unref(rq);
		}
		return;
	}
	if (pss->resp_pending) {
		pss->resp_pending = false;
		transaction_end(wsi, pss);
	}
}

static void flush_cb(lws_sorted_usec_list_t *sul)
{
	http_flush(lws_container_of(sul, struct http_pss, sul_flush));
}

/* The credentials of `Authorization: Bearer <credential>`, copied into
 * buf (AUTHZ_MAX + 16 bytes). Returns BEARER_OK with *cred and *len set,
 * BEARER_NONE (no header), BEARER_TOO_LONG (over AUTHZ_MAX: a JWT is at most
 * 8 KiB) or BEARER_BAD (another scheme, or empty). */
#define AUTHZ_MAX 8192
enum bearer { BEARER_OK, BEARER_NONE, BEARER_TOO_LONG, BEARER_BAD };

static enum bearer bearer(struct lws *wsi, char *buf, size_t size, const char **cred,
			  size_t *len)
{
	int n = lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_AUTHORIZATION);
	const char *p;

	if (n <= 0)
		return BEARER_NONE;
	if (n > AUTHZ_MAX + 7 + 8 || lws_hdr_copy(wsi, buf, (int)size, WSI_TOKEN_HTTP_AUTHORIZATION) < 0)
		return BEARER_TOO_LONG;
	if (strncasecmp(buf, "Bearer ", 7))
		return BEARER_BAD;
	for (p = buf + 7; *p == ' '; p++)
		;
	*cred = p;
	*len = strlen(p);
	if (!*len)
		return BEARER_BAD;
	return *len > AUTHZ_MAX ? BEARER_TOO_LONG : BEARER_OK;
}

static const char *bearer_problem(enum bearer b)
{
	return b == BEARER_NONE ? "missing credentials (Authorization: Bearer <key or token>)" :
	       b == BEARER_TOO_LONG ? "credentials longer than 8192 bytes" :
	       "expected Authorization: Bearer <key or token>";
}

/* Operator API auth (docs/protocol.md): `Authorization: Bearer <api key>`.
 * Returns 0 when the key has the scope; otherwise answers 401/403 and
 * returns 1. */
static int require_scope(struct lws *wsi, struct http_pss *pss, struct hub *hub,
			 unsigned scope, int *rc, auth_principal *keep)
{
	char authz[AUTHZ_MAX + 16];
	const char *cred;
	size_t clen;
	auth_principal who;
	enum bearer b = bearer(wsi, authz, sizeof(authz), &cred, &clen);

	if (b != BEARER_OK || auth_check_api_key(hub->auth, cred, clen, &who) != AUTH_OK) {
		hub->metrics.api_auth_failures_total++;
		*rc = respond_error(wsi, pss, 401, "unauthorized",
				    b != BEARER_OK ? bearer_problem(b) : "unknown API key");
		return 1;
	}
	bool ok = auth_has_scope(&who, scope);
	if (ok && keep)
		*keep = who; /* the caller clears it */
	else
		auth_principal_clear(&who);
	if (!ok) {
		*rc = respond_error(wsi, pss, 403, "forbidden",
				    "this API key lacks the scope this route needs");
		return 1;
	}
	return 0;
}

/* ---- asynchronous requests (hub/api.h) -------------------------------------
 *
 * A struct hub_req lives on the heap. The pss holds one reference while the
 * connection is open; each pending Redis command holds one (taken by api.c).
 * CLOSED_HTTP / WSI_DESTROY clear rq->wsi and drop the pss's reference, so a
 * late reply finds hub_req_gone() true and never touches a closed wsi.
 *
 * Output is queued in rq->out (LWS_PRE headroom, then bytes not yet written)
 * and written on HTTP_WRITEABLE: the headers in one callback, then at most
 * BODY_CHUNK bytes per callback. A streamed response frames each part as one
 * HTTP/1.1 chunk and asks its producer for the next part (drained) only when
 * `out` has been written completely. */


static struct hub_req *req_new(struct lws *wsi, struct hub *hub, auth_principal *who)
{
	struct hub_req *rq = hub_xcalloc(1, sizeof(*rq));

	rq->refs = 1; /* the pss's */
	rq->wsi = wsi;
	rq->hub = hub;
	rq->who = *who; /* takes ownership */
	memset(who, 0, sizeof(*who));
	body_init(&rq->out);
	return rq;
}

struct hub *hub_req_hub(const struct hub_req *rq) { return rq->hub; }
const auth_principal *hub_req_who(const struct hub_req *rq) { return &rq->who; }
void *hub_req_ctx(const struct hub_req *rq) { return rq->ctx; }

bool hub_req_gone(const struct hub_req *rq)
{
	return !rq->wsi || rq->aborted || (rq->answered && !rq->chunked) ||
	       (rq->chunked && rq->final);
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

/* The connection is closing: the request can send nothing more. */
static void req_detach(struct http_pss *pss)
{
	struct hub_req *rq = pss ? pss->rq : NULL;

	if (!rq)
		return;
	pss->rq = NULL;
	rq->wsi = NULL;
	hub_req_unref(rq);
}

/* Moves what the request has queued (its headers first) onto the wire. */
static void req_gather(struct http_pss *pss)
{
	struct hub_req *rq = pss->rq;
	size_t n = rq->out.len - LWS_PRE;

	if (!rq->answered)
		return;
	if (rq->headers_pending) {
		if (build_head(pss->wsi, pss, rq->status, rq->ctype, n, rq->chunked)) {
			rq->aborted = true;
			return;
		}
		rq->headers_pending = false;
	}
	if (n) {
		hub_buf_append(&pss->wire, rq->out.data + LWS_PRE, n);
		rq->out.len = LWS_PRE;
		if (rq->out.cap > 4 * 1024 * 1024) { /* give a big page's memory back */
			hub_buf_free(&rq->out);
			body_init(&rq->out);
		}
	}
}

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

static int route_api(struct lws *wsi, struct http_pss *pss, struct hub *hub,
		     const char *path)
{
	auth_principal who;
	struct hub_query q;
	hub_buf mem = { 0 };
	int rc;

	if (require_scope(wsi, pss, hub, AUTH_SCOPE_TELEMETRY_READ, &rc, &who))
		return rc;
	if (collect_query(wsi, &q, &mem)) {
		hub_buf_free(&mem);
		auth_principal_clear(&who);
		body_init(&pss->body);
		json_error_field(&pss->body, "invalid", "query",
				 "too many query parameters");
		return respond(wsi, pss, 422, "application/json");
	}
	req_detach(pss); /* a previous request on this connection, if any */
	pss->rq = req_new(wsi, hub, &who);
	struct hub_req *rq = pss->rq;
	hub_req_ref(rq);
	hub_api_handle(rq, path, &q);
	hub_req_unref(rq);
	hub_buf_free(&mem);
	return 0;
}

/* The browser dashboard: files directly in web-root (no subdirectories, so
 * no path can climb out), "/" = index.html. Small files, read per request. */
static int serve_static(struct lws *wsi, struct http_pss *pss, struct hub *hub,
			const char *path)
{
	static const struct { const char *ext, *type; } types[] = {
		{ ".html", "text/html; charset=utf-8" },
		{ ".js", "text/javascript; charset=utf-8" },
		{ ".css", "text/css; charset=utf-8" },
		{ ".svg", "image/svg+xml" },
		{ ".png", "image/png" },
		{ ".ico", "image/x-icon" },
		{ ".json", "application/json" },
	};
	const char *name = path[0] == '/' && path[1] ? path + 1 : "index.html";
	const char *ctype = NULL, *dot = strrchr(name, '.');
	char file[1024];
	size_t len;
	char *data;

	for (const char *c = name; *c; c++)
		if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
		      (*c >= '0' && *c <= '9') || *c == '-' || *c == '_' || *c == '.'))
			return respond_error(wsi, pss, 404, "not_found", "no such route");
	for (size_t i = 0; dot && i < sizeof(types) / sizeof(types[0]); i++)
		if (!strcmp(dot, types[i].ext))
			ctype = types[i].type;
	if (name[0] == '.' || !ctype ||
	    (size_t)snprintf(file, sizeof(file), "%s/%s", hub->cfg.web_root, name) >= sizeof(file))
		return respond_error(wsi, pss, 404, "not_found", "no such route");
	data = hub_read_file(file, 4 * 1024 * 1024, &len);
	if (!data)
		return respond_error(wsi, pss, 404, "not_found", "no such file");
	body_init(&pss->body);
	hub_buf_append(&pss->body, data, len);
	free(data);
	return respond(wsi, pss, 200, ctype);
}

static int body_done(struct lws *wsi, struct http_pss *pss);

/* Commands API (commands/cmd_api.h): any valid key gets this far, the routes
 * check their scopes. A POST is dispatched once its body is complete. */
static int route_commands(struct lws *wsi, struct http_pss *pss, struct hub *hub,
			  const char *path, bool post)
{
	auth_principal who;
	int rc, n;

	if (require_scope(wsi, pss, hub, 0, &rc, &who))
		return rc;
	hub_buf_free(&pss->qmem);
	if (collect_query(wsi, &pss->q, &pss->qmem) || strlen(path) >= sizeof(pss->path)) {
		auth_principal_clear(&who);
		body_init(&pss->body);
		json_error_field(&pss->body, "invalid", "query", "too many query parameters");
		return respond(wsi, pss, 422, "application/json");
	}
	snprintf(pss->path, sizeof(pss->path), "%s", path);
	n = lws_hdr_custom_copy(wsi, pss->idem, sizeof(pss->idem), "idempotency-key:", 16);
	if (n < 0)
		pss->idem[0] = '\0';
	req_detach(pss);
	pss->rq = req_new(wsi, hub, &who);
	if (post) {
		pss->too_large = false;
		pss->reqbody.len = 0;
		pss->collecting = true;
		/* With a Content-Length the body follows (body_done runs at
		 * HTTP_BODY_COMPLETION); without one it is empty (RFC 9112 6.3)
		 * and lws reports no completion: answer now. */
		return pss->has_body ? 0 : body_done(wsi, pss);
	}
	struct hub_req *rq = pss->rq;
	hub_req_ref(rq);
	cmd_api_handle(rq, "GET", pss->path, &pss->q, NULL, 0, NULL);
	hub_req_unref(rq);
	return 0;
}

static int body_done(struct lws *wsi, struct http_pss *pss)
{
	struct hub_req *rq = pss->rq;

	(void)wsi;
	if (!pss->collecting || !rq)
		return 0;
	pss->collecting = false;
	hub_req_ref(rq);
	if (pss->too_large)
		hub_req_error(rq, 413, "too_large", NULL, "request bodies are limited to 64 KiB");
	else
		cmd_api_handle(rq, "POST", pss->path, &pss->q, pss->reqbody.data ? pss->reqbody.data : "",
			       pss->reqbody.len, pss->idem[0] ? pss->idem : NULL);
	hub_req_unref(rq);
	hub_buf_free(&pss->reqbody);
	return 0;
}

static int route(struct lws *wsi, struct http_pss *pss, struct hub *hub, const char *path)
{
	bool get = lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) > 0;
	bool post = lws_hdr_total_length(wsi, WSI_TOKEN_POST_URI) > 0;

	if (cmd_api_handles(path)) {
		if (!get && !post)
			return respond_error(wsi, pss, 405, "method_not_allowed",
					     "only GET and POST are supported here");
		return route_commands(wsi, pss, hub, path, post);
	}

	if (hub_api_handles(path)) {
		if (!get)
			return respond_error(wsi, pss, 405, "method_not_allowed",
					     "only GET is supported here");
		return route_api(wsi, pss, hub, path);
	}
	if (!strcmp(path, "/v1/openapi.json")) {
		if (!get)
			return respond_error(wsi, pss, 405, "method_not_allowed",
					     "only GET is supported here");
		body_init(&pss->body);
		hub_buf_append(&pss->body, hub_openapi_json, hub_openapi_json_len);
		return respond(wsi, pss, 200, "application/json");
	}
	if (!strcmp(path, "/healthz") || !strcmp(path, "/readyz") ||
	    !strcmp(path, "/metrics") || !strcmp(path, "/v1/device-types")) {
		if (!get)
			return respond_error(wsi, pss, 405, "method_not_allowed",
					     "only GET is supported here");
	} else if (hub->cfg.web_root && get) {
		return serve_static(wsi, pss, hub, path);
	} else {
		return respond_error(wsi, pss, 404, "not_found", "no such route");
	}

	body_init(&pss->body);
	if (!strcmp(path, "/healthz")) {
		hub_buf_puts(&pss->body, "{\"status\":\"ok\"}");
		return respond(wsi, pss, 200, "application/json");
	}
	if (!strcmp(path, "/readyz")) {
		bool redis = hub_redis_up(hub->redis);
		bool schemas = hub->schemas && schema_set_count(hub->schemas) > 0;
		bool ready = redis && schemas && !hub->draining;
		hub_buf_printf(&pss->body,
			       "{\"status\":\"%s\",\"redis\":%s,\"schemas\":%zu,\"draining\":%s}",
			       ready ? "ready" : "not_ready", redis ? "true" : "false",
			       hub->schemas ? schema_set_count(hub->schemas) : 0,
			       hub->draining ? "true" : "false");
		return respond(wsi, pss, ready ? 200 : 503, "application/json");
	}
	if (!strcmp(path, "/metrics")) {
		pss->body.len = LWS_PRE;
		hub_metrics_render(hub, &pss->body);
		return respond(wsi, pss, 200, "text/plain; version=0.0.4");
	}
	/* /v1/device-types */
	int rc;
	if (require_scope(wsi, pss, hub, AUTH_SCOPE_TELEMETRY_READ, &rc, NULL))
		return rc;
	body_init(&pss->body);
	hub_buf_puts(&pss->body, "{\"device_types\":[");
	for (size_t i = 0; hub->schemas && i < schema_set_count(hub->schemas); i++) {
		char *s = json_dumps(schema_type_json(schema_set_at(hub->schemas, i)),
				     JSON_COMPACT);
		if (i)
			hub_buf_puts(&pss->body, ",");
		hub_buf_puts(&pss->body, s ? s : "null");
		free(s);
	}
	hub_buf_puts(&pss->body, "]}");
	return respond(wsi, pss, 200, "application/json");
}

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

/* Refuses an upgrade with a real HTTP status, from CONFIRM_UPGRADE (the
 * one place lws 4.1.6 lets a refused upgrade answer at all; returning
 * non-zero from FILTER_PROTOCOL_CONNECTION only drops the TCP connection).
 * lws would write the status line as HTTP/1.0 here (it learns the request's
 * version only for requests that are not upgrades), which WebSocket clients
 * reject as a bad response: the status line is written by hand. */
static int refuse_upgrade(struct lws *wsi, unsigned status, const char *code,
			  const char *message)
{
	uint8_t buf[LWS_PRE + 1024], *start = buf + LWS_PRE, *p = start,
		*end = buf + sizeof(buf) - 1;
	hub_buf body = { 0 };
	char clen[24];
	int n;

	json_error(&body, code, message);
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
 * when that is the path's own protocol, so a list such as
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

/* Dashboards: the token may come in the Authorization header (checked here:
 * 401/403 like the HTTP API) or, for browsers, in a first auth message. */
static int confirm_stream_upgrade(struct lws *wsi, struct hub *hub)
{
	char authz[AUTHZ_MAX + 16];
	struct gw_handshake *hs;
	const char *why, *tok;
	size_t tlen;
	enum bearer b;

	if (!protocol_selected(wsi, STREAM_SUBPROTOCOL))
		return refuse_upgrade(wsi, 400, "bad_subprotocol",
				      "the stream endpoint needs subprotocol " STREAM_SUBPROTOCOL
				      " (first among the names this hub serves)");
	b = bearer(wsi, authz, sizeof(authz), &tok, &tlen);
	if (b != BEARER_OK && b != BEARER_NONE) {
		hub->metrics.stream_auth_failures_total++;
		return refuse_upgrade(wsi, 401, "unauthorized", bearer_problem(b));
	}
	hs = hub_xcalloc(1, sizeof(*hs));
	hs->stream = true;
	if (b == BEARER_NONE) {
		hs->anonymous = true;
	} else {
		enum stream_auth rc;

		rc = stream_authenticate(hub, tok, tlen, &hs->who, &why);
		if (rc != STREAM_AUTH_OK) {
			free(hs);
			hub->metrics.stream_auth_failures_total++;
			return refuse_upgrade(wsi, rc == STREAM_AUTH_FORBIDDEN ? 403 : 401,
					      rc == STREAM_AUTH_FORBIDDEN ? "forbidden" : "unauthorized",
					      why);
		}
	}
	lws_set_opaque_user_data(wsi, hs);
	return 0;
}

static int confirm_upgrade(struct lws *wsi, struct hub *hub)
{
	char uri[128], authz[AUTHZ_MAX + 16];
	const char *tok;
	size_t tlen;
	auth_principal who;
	enum bearer b;
	int rc;

	if (lws_hdr_total_length(wsi, WSI_TOKEN_GET_URI) <= 0)
		return refuse_upgrade(wsi, 400, "bad_request", "upgrade needs a GET");
	if (lws_hdr_copy(wsi, uri, sizeof(uri), WSI_TOKEN_GET_URI) < 0)
		return refuse_upgrade(wsi, 404, "not_found", "no WebSocket endpoint at this path");
	if (!strcmp(uri, STREAM_PATH))
		return confirm_stream_upgrade(wsi, hub);
	if (strcmp(uri, GW_PATH))
		return refuse_upgrade(wsi, 404, "not_found", "no WebSocket endpoint at this path");
	if (!protocol_selected(wsi, GW_SUBPROTOCOL))
		return refuse_upgrade(wsi, 400, "bad_subprotocol",
				      "the gateway endpoint needs subprotocol " GW_SUBPROTOCOL
				      " (first among the names this hub serves)");
	b = bearer(wsi, authz, sizeof(authz), &tok, &tlen);
	if (b != BEARER_OK) {
		hub->metrics.auth_failures_total++;
		return refuse_upgrade(wsi, 401, "unauthorized", bearer_problem(b));
	}
	rc = auth_verify_jwt(hub->auth, tok, tlen, hub_now_ms() / 1000, &who);
	if (rc != AUTH_OK) {
		hub->metrics.auth_failures_total++;
		hub_info("gateway upgrade refused: %s", auth_strerror(rc));
		return refuse_upgrade(wsi, 401, "unauthorized", auth_strerror(rc));
	}
	if (hub->cfg.tls_client_ca) {
		union lws_tls_cert_info_results *ci;
		char big[sizeof(*ci) + 256];
		ci = (union lws_tls_cert_info_results *)big;
		if (lws_tls_peer_cert_info(wsi, LWS_TLS_CERT_INFO_COMMON_NAME, ci,
					   sizeof(big) - sizeof(*ci) + sizeof(ci->ns.name)) ||
		    strcmp(ci->ns.name, who.name)) {
			hub->metrics.auth_failures_total++;
			hub_info("gateway upgrade refused: client certificate CN does not match sub %s",
				 who.name);
			auth_principal_clear(&who);
			return refuse_upgrade(wsi, 401, "unauthorized",
					      "client certificate CN does not match the token's sub");
		}
	}
	struct gw_handshake *hs = hub_xcalloc(1, sizeof(*hs));
	hs->who = who;
	lws_set_opaque_user_data(wsi, hs);
	return 0;
}

static void free_handshake(struct lws *wsi)
{
	struct gw_handshake *hs = lws_get_opaque_user_data(wsi);

	if (hs) {
		lws_set_opaque_user_data(wsi, NULL);
		auth_principal_clear(&hs->who);
		free(hs);
	}
}

/* ---- the request's life ------------------------------------------------
 *
 * lws 4.1.6 mishandles pipelined requests with bodies in two ways. Bytes
 * read behind a completed body are handed to the body's completion again
 * and again while the response is pending (on_body_completion stops reading
 * until the transaction is over). And a request that carries a body, when
 * its bytes were already buffered behind an earlier request:
 * after the HTTP callback it feeds the buffered request to itself again as
 * its own body, then loops forever calling HTTP_BODY_COMPLETION without
 * consuming anything (the process spins and never sees a signal). The first
 * "body" bytes it hands over are then the request's own request line. So a
 * body whose first bytes are the request's method and a space closes the
 * connection (no JSON body the API takes starts that way), and so does a
 * second completion of the same body. Nothing is written before that,
 * because responses go out on HTTP_WRITEABLE only: the client sees every
 * earlier response complete, then the close. Pipelined requests without a
 * body are answered in order. docs/protocol.md lists the limits. */

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
	struct hub *hub = lws_context_user(lws_get_context(pss->wsi));

	pss->body_timer = false;
	hub->metrics.http_refused[HUB_HTTP_BODY_TIMEOUT]++;
	hub_info("http: request body not complete within %d s: closing",
		 hub->cfg.http_body_timeout_s);
	lws_set_timeout(pss->wsi, PENDING_TIMEOUT_HTTP_CONTENT, LWS_TO_KILL_ASYNC);
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
	hub_buf_free(&pss->body);
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

/* A request has arrived (headers complete): checks what no route accepts,
 * then routes it. */
static int on_request(struct lws *wsi, struct http_pss *pss, struct hub *hub,
		      const char *path)
{
	bool bad_length;
	unsigned long long clen;
	int plen;

	pss->wsi = wsi;
	plen = request_method(wsi, pss->method);
	if (plen > HUB_HTTP_URI_MAX ||
	    lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_URI_ARGS) > HUB_HTTP_URI_MAX) {
		hub->metrics.http_refused[HUB_HTTP_URI_TOO_LONG]++;
		pss->close_after = true;
		return respond_error(wsi, pss, 414, "uri_too_long",
				     "the URL path and the query are limited to 4096 bytes each");
	}
	if (lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_TRANSFER_ENCODING) > 0) {
		/* lws 4.1.6 does not deliver chunked request bodies (it would
		 * read them as the next request): ask for a Content-Length
		 * (RFC 9110 15.5.12) and close. */
		hub->metrics.http_refused[HUB_HTTP_CHUNKED_BODY]++;
		pss->close_after = true;
		return respond_error(wsi, pss, 411, "length_required",
				     "send the body with a Content-Length (chunked bodies are not supported)");
	}
	clen = content_length(wsi, &bad_length);
	if (bad_length) {
		pss->close_after = true;
		return respond_error(wsi, pss, 400, "bad_request", "malformed Content-Length");
	}
	if (clen > MAX_REQUEST_BODY) {
		hub->metrics.http_refused[HUB_HTTP_BODY_TOO_LARGE]++;
		pss->close_after = true;
		return respond_error(wsi, pss, 413, "too_large",
				     "request bodies are limited to 64 KiB");
	}
	if (!clen)
		stop_reading(wsi); /* complete: not read until answered (above) */
	if (clen) {
		/* A request with a body is the last on its connection: lws 4.1.6
		 * cannot be trusted with what follows a body (above). */
		pss->has_body = true;
		pss->close_after = true;
		if (strcmp(pss->method, "POST"))
			return respond_error(wsi, pss, 400, "bad_request",
					     "only POST requests may carry a body here");
		pss->body_timer = true;
		lws_sul_schedule(hub->ctx, 0, &pss->sul_body, body_deadline,
				 (lws_usec_t)hub->cfg.http_body_timeout_s * LWS_US_PER_SEC);
	}
	return route(wsi, pss, hub, path);
}

static int on_body(struct lws *wsi, struct http_pss *pss, struct hub *hub,
		   const char *in, size_t len)
{
	if (!pss->body_seen) {
		pss->body_seen = true;
		if (in && body_is_request_line(in, len, pss->method)) {
			hub->metrics.http_refused[HUB_HTTP_PIPELINE_CLOSED]++;
			hub_info("http: a pipelined request with a body: closing the connection");
			return -1;
		}
	}
	if (pss->collecting && !pss->too_large && in && len) {
		if (pss->reqbody.len + len > MAX_REQUEST_BODY)
			pss->too_large = true;
		else
			hub_buf_append(&pss->reqbody, in, len);
	}
	return 0;
}

static int on_body_completion(struct lws *wsi, struct http_pss *pss, struct hub *hub)
{
	if (pss->body_completed) {
		/* lws's loop over a pipelined body (above): never act twice. */
		hub->metrics.http_refused[HUB_HTTP_PIPELINE_CLOSED]++;
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
	return body_done(wsi, pss);
}

/* ---- requests whose headers lws could not hold ------------------------------
 * A request line and headers over HUB_HTTP_HEADER_MAX make lws 4.1.6 log an
 * error and close the connection with no status and no callback. Its log
 * line is the only sign: hub_http_lws_log() sees it and arms a 431 that the
 * socket shutdown following on the same call stack writes first
 * (hub/lws_quirks.c). */

static struct hub *log_hub;

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

void hub_http_init(struct hub *hub)
{
	log_hub = hub;
}

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
		if (!in || strcmp((const char *)in, "websocket"))
			return refuse_upgrade(wsi, 400, "bad_request", "only WebSocket upgrades");
		return confirm_upgrade(wsi, hub);
	case LWS_CALLBACK_HTTP:
		if (!pss)
			return -1;
		return on_request(wsi, pss, hub, (const char *)in) ? -1 : 0;
	case LWS_CALLBACK_HTTP_BODY:
		return pss ? on_body(wsi, pss, hub, in, len) : 0;
	case LWS_CALLBACK_HTTP_BODY_COMPLETION:
		return pss ? on_body_completion(wsi, pss, hub) : 0;
	case LWS_CALLBACK_HTTP_WRITEABLE:
		return 0; /* answers are sent by http_flush */
	case LWS_CALLBACK_HTTP_DROP_PROTOCOL:
		if (pss)
			pss_release(pss);
		break;
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

const struct lws_protocols hub_http_protocol = {
	"http", http_callback, sizeof(struct http_pss), 0, 0, NULL, 0
};
