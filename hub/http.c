#include "hub/http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "hub/api.h"
#include "commands/cmd_api.h"
#include "hub/hub.h"
#include "hub/log.h"
#include "hub/redis.h"
#include "hub/util.h"
#include "protocols/gateway.h"
#include "protocols/stream.h"

#define BODY_CHUNK 16384

/* A streamed response whose client stops reading is closed after this long
 * without progress. */
#define STREAM_IDLE_S 60

#define MAX_REQUEST_BODY (64 * 1024)

/* docs/openapi.json, embedded at build time (cmake/embed.cmake). */
extern const unsigned char hub_openapi_json[];
extern const size_t hub_openapi_json_len;

struct http_pss {
	hub_buf body;   /* LWS_PRE headroom, then the body */
	size_t sent;
	struct hub_req *rq; /* an asynchronous API request (hub/api.h) */
	/* A POST waiting for its body (commands API). */
	bool collecting, too_large;
	hub_buf reqbody;
	hub_buf qmem;
	struct hub_query q;
	char path[256];
	char idem[160];
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

/* Writes the status line and headers now and the body on WRITEABLE. */
static int respond(struct lws *wsi, struct http_pss *pss, unsigned status,
		   const char *ctype)
{
	uint8_t hdr[LWS_PRE + 1024], *start = hdr + LWS_PRE, *p = start,
		*end = hdr + sizeof(hdr) - 1;
	size_t blen = pss->body.len - LWS_PRE;

	if (lws_add_http_common_headers(wsi, status, ctype, blen, &p, end) ||
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"cache-control:",
					(const unsigned char *)"no-store", 8, &p, end) ||
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"x-content-type-options:",
					(const unsigned char *)"nosniff", 7, &p, end) ||
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"content-security-policy:",
					(const unsigned char *)CSP, sizeof(CSP) - 1, &p, end))
		return -1;
	if (status == 401 &&
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"www-authenticate:",
					(const unsigned char *)"Bearer realm=\"iot-hub\"", 21, &p, end))
		return -1;
	if (lws_finalize_write_http_header(wsi, start, &p, end))
		return -1;
	pss->sent = 0;
	lws_callback_on_writable(wsi);
	return 0;
}

static int respond_error(struct lws *wsi, struct http_pss *pss, unsigned status,
			 const char *code, const char *message)
{
	body_init(&pss->body);
	json_error(&pss->body, code, message);
	return respond(wsi, pss, status, "application/json");
}

/* Writes n body bytes at offset off of b (which starts with LWS_PRE bytes of
 * headroom). lws_write needs LWS_PRE writable bytes before the data it
 * sends: the bytes already sent there are saved and put back. Returns 0 or
 * -1 on a failed write. */
static int write_slice(struct lws *wsi, hub_buf *b, size_t off, size_t n, bool last)
{
	unsigned char *at = (unsigned char *)b->data + LWS_PRE + off;
	unsigned char save[LWS_PRE];
	int w;

	memcpy(save, at - LWS_PRE, LWS_PRE);
	w = lws_write(wsi, at, n, last ? LWS_WRITE_HTTP_FINAL : LWS_WRITE_HTTP);
	memcpy(at - LWS_PRE, save, LWS_PRE);
	return w < (int)n ? -1 : 0;
}

static int write_body(struct lws *wsi, struct http_pss *pss)
{
	size_t blen = pss->body.len - LWS_PRE, left = blen - pss->sent;
	size_t n = left > BODY_CHUNK ? BODY_CHUNK : left;
	bool last = n == left;

	if (write_slice(wsi, &pss->body, pss->sent, n, last))
		return -1;
	pss->sent += n;
	if (!last) {
		lws_callback_on_writable(wsi);
		return 0;
	}
	hub_buf_free(&pss->body);
	return lws_http_transaction_completed(wsi) ? -1 : 0;
}

/* Operator API auth (CONTRACT §4): `Authorization: Bearer <api key>`. Returns
 * 0 when the key has the scope; otherwise answers 401/403 and returns 1. */
static int require_scope(struct lws *wsi, struct http_pss *pss, struct hub *hub,
			 unsigned scope, int *rc, auth_principal *keep)
{
	char authz[512];
	auth_principal who;
	int n = lws_hdr_copy(wsi, authz, sizeof(authz), WSI_TOKEN_HTTP_AUTHORIZATION);

	if (n <= 7 || strncasecmp(authz, "Bearer ", 7) ||
	    auth_check_api_key(hub->auth, authz + 7, (size_t)n - 7, &who) != AUTH_OK) {
		hub->metrics.auth_failures_total++;
		*rc = respond_error(wsi, pss, 401, "unauthorized",
				    n <= 7 ? "missing API key (Authorization: Bearer <key>)"
					   : "unknown API key");
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
	hub_buf out;                /* LWS_PRE headroom, then unsent bytes */
	size_t sent;
	hub_req_drained_cb drained;
	void *ctx;
	void (*ctx_free)(void *);
};

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
	if (rq->wsi)
		lws_callback_on_writable(rq->wsi);
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

static int req_write_headers(struct lws *wsi, struct hub_req *rq)
{
	uint8_t hdr[LWS_PRE + 1024], *start = hdr + LWS_PRE, *p = start,
		*end = hdr + sizeof(hdr) - 1;

	if (rq->chunked) {
		if (lws_add_http_header_status(wsi, rq->status, &p, end) ||
		    lws_add_http_header_by_token(wsi, WSI_TOKEN_HTTP_CONTENT_TYPE,
						 (const unsigned char *)rq->ctype,
						 (int)strlen(rq->ctype), &p, end) ||
		    lws_add_http_header_by_name(wsi, (const unsigned char *)"transfer-encoding:",
						(const unsigned char *)"chunked", 7, &p, end))
			return -1;
	} else if (lws_add_http_common_headers(wsi, rq->status, rq->ctype,
					       rq->out.len - LWS_PRE, &p, end)) {
		return -1;
	}
	if (lws_add_http_header_by_name(wsi, (const unsigned char *)"cache-control:",
					(const unsigned char *)"no-store", 8, &p, end) ||
	    lws_finalize_write_http_header(wsi, start, &p, end))
		return -1;
	return 0;
}

static int req_writeable(struct lws *wsi, struct http_pss *pss)
{
	struct hub_req *rq = pss->rq;

	if (rq->aborted)
		return -1;
	if (!rq->answered)
		return 0;
	if (rq->headers_pending) {
		if (req_write_headers(wsi, rq))
			return -1;
		rq->headers_pending = false;
		if (rq->out.len > LWS_PRE || rq->final || rq->drained) {
			lws_callback_on_writable(wsi);
			if (rq->chunked)
				lws_set_timeout(wsi, PENDING_TIMEOUT_HTTP_CONTENT, STREAM_IDLE_S);
		}
		return 0;
	}
	size_t left = rq->out.len - LWS_PRE - rq->sent;
	if (left) {
		size_t n = left > BODY_CHUNK ? BODY_CHUNK : left;
		bool last = n == left && rq->final;
		if (write_slice(wsi, &rq->out, rq->sent, n, last))
			return -1;
		rq->sent += n;
		if (rq->chunked)
			lws_set_timeout(wsi, PENDING_TIMEOUT_HTTP_CONTENT, STREAM_IDLE_S);
		if (n < left) {
			lws_callback_on_writable(wsi);
			return 0;
		}
	}
	/* Everything queued is written. */
	rq->out.len = LWS_PRE;
	rq->sent = 0;
	if (rq->final) {
		lws_set_timeout(wsi, NO_PENDING_TIMEOUT, 0);
		req_detach(pss);
		return lws_http_transaction_completed(wsi) ? -1 : 0;
	}
	if (rq->out.cap > 4 * 1024 * 1024) { /* give a big page's memory back */
		hub_buf_free(&rq->out);
		body_init(&rq->out);
	}
	if (rq->drained) {
		hub_req_ref(rq);
		rq->drained(rq);
		hub_req_unref(rq);
	}
	return 0;
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

/* True if the header value s contains word (ASCII, any case). */
static bool has_token_ci(const char *s, const char *word)
{
	size_t n = strlen(word);

	for (; *s; s++)
		if (!strncasecmp(s, word, n))
			return true;
	return false;
}

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
		char te[32];
		pss->too_large = false;
		pss->reqbody.len = 0;
		/* lws 4.1.6 does not deliver chunked request bodies: ask for a
		 * Content-Length (RFC 9110 15.5.12) rather than wait forever. */
		if (lws_hdr_copy(wsi, te, sizeof(te), WSI_TOKEN_HTTP_TRANSFER_ENCODING) > 0 &&
		    has_token_ci(te, "chunked")) {
			req_detach(pss);
			return respond_error(wsi, pss, 411, "length_required",
					     "send the body with a Content-Length (chunked bodies are not supported)");
		}
		/* With a Content-Length the body follows; without one it is empty
		 * (RFC 9112 6.3) and lws reports no completion: answer now. */
		if (lws_hdr_total_length(wsi, WSI_TOKEN_HTTP_CONTENT_LENGTH) > 0) {
			pss->collecting = true;
			return 0;
		}
		pss->collecting = true;
		return body_done(wsi, pss);
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

/* Refuses an upgrade with a real HTTP status (NOTES: returning non-zero from
 * FILTER_PROTOCOL_CONNECTION only drops the TCP connection). */
static int refuse_upgrade(struct lws *wsi, unsigned status, const char *code,
			  const char *message)
{
	uint8_t buf[LWS_PRE + 1024], *start = buf + LWS_PRE, *p = start,
		*end = buf + sizeof(buf) - 1;
	hub_buf body = { 0 };

	json_error(&body, code, message);
	if (lws_add_http_common_headers(wsi, status, "application/json", body.len, &p, end))
		goto out;
	if (status == 401 &&
	    lws_add_http_header_by_name(wsi, (const unsigned char *)"www-authenticate:",
					(const unsigned char *)"Bearer realm=\"iot-hub\"", 21,
					&p, end))
		goto out;
	if (lws_add_http_header_by_name(wsi, (const unsigned char *)"connection:",
					(const unsigned char *)"close", 5, &p, end))
		goto out;
	if (lws_finalize_write_http_header(wsi, start, &p, end))
		goto out;
	if ((size_t)(end - p) > body.len + LWS_PRE) {
		memcpy(p + LWS_PRE, body.data, body.len);
		lws_write(wsi, p + LWS_PRE, body.len, LWS_WRITE_HTTP_FINAL);
	}
out:
	hub_buf_free(&body);
	return 1;
}

static bool protocol_requested(struct lws *wsi, const char *want)
{
	char list[256];
	size_t wl = strlen(want);

	if (lws_hdr_copy(wsi, list, sizeof(list), WSI_TOKEN_PROTOCOL) <= 0)
		return false;
	for (char *tok = strtok(list, ", "); tok; tok = strtok(NULL, ", "))
		if (strlen(tok) == wl && !memcmp(tok, want, wl))
			return true;
	return false;
}

/* Dashboards: the token may come in the Authorization header (checked here:
 * 401/403 like the HTTP API) or, for browsers, in a first auth message. */
static int confirm_stream_upgrade(struct lws *wsi, struct hub *hub)
{
	char authz[8192 + 16];
	struct gw_handshake *hs;
	const char *why;
	int n;

	if (!protocol_requested(wsi, STREAM_SUBPROTOCOL))
		return refuse_upgrade(wsi, 400, "bad_subprotocol",
				      "the stream endpoint needs subprotocol " STREAM_SUBPROTOCOL);
	hs = hub_xcalloc(1, sizeof(*hs));
	hs->stream = true;
	n = lws_hdr_copy(wsi, authz, sizeof(authz), WSI_TOKEN_HTTP_AUTHORIZATION);
	if (n <= 0) {
		hs->anonymous = true;
	} else {
		const char *tok = authz + 7;
		enum stream_auth rc;

		if (n <= 7 || strncasecmp(authz, "Bearer ", 7)) {
			free(hs);
			hub->metrics.stream_auth_failures_total++;
			return refuse_upgrade(wsi, 401, "unauthorized", "expected Authorization: Bearer <token>");
		}
		while (*tok == ' ')
			tok++;
		rc = stream_authenticate(hub, tok, strlen(tok), &hs->who, &why);
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
	char uri[128], authz[8192 + 16];
	auth_principal who;
	int n, rc;

	if (lws_hdr_copy(wsi, uri, sizeof(uri), WSI_TOKEN_GET_URI) <= 0)
		return refuse_upgrade(wsi, 400, "bad_request", "upgrade needs a GET");
	if (!strcmp(uri, STREAM_PATH))
		return confirm_stream_upgrade(wsi, hub);
	if (strcmp(uri, GW_PATH))
		return refuse_upgrade(wsi, 404, "not_found", "no WebSocket endpoint at this path");
	if (!protocol_requested(wsi, GW_SUBPROTOCOL))
		return refuse_upgrade(wsi, 400, "bad_subprotocol",
				      "the gateway endpoint needs subprotocol " GW_SUBPROTOCOL);
	n = lws_hdr_copy(wsi, authz, sizeof(authz), WSI_TOKEN_HTTP_AUTHORIZATION);
	if (n <= 7 || strncasecmp(authz, "Bearer ", 7)) {
		hub->metrics.auth_failures_total++;
		return refuse_upgrade(wsi, 401, "unauthorized", "missing Bearer token");
	}
	const char *tok = authz + 7;
	while (*tok == ' ')
		tok++;
	rc = auth_verify_jwt(hub->auth, tok, strlen(tok), hub_now_ms() / 1000, &who);
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

static int http_callback(struct lws *wsi, enum lws_callback_reasons reason,
			 void *user, void *in, size_t len);

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
		 * (NOTES: the default handler accepts foreign certificates). */
		return len ? 0 : 1;
	case LWS_CALLBACK_HTTP_CONFIRM_UPGRADE:
		if (!in || strcmp((const char *)in, "websocket"))
			return refuse_upgrade(wsi, 400, "bad_request", "only WebSocket upgrades");
		return confirm_upgrade(wsi, hub);
	case LWS_CALLBACK_HTTP:
		if (!pss)
			return -1;
		return route(wsi, pss, hub, (const char *)in) ? -1 : 0;
	case LWS_CALLBACK_HTTP_BODY:
		/* Kept only for a route that waits for one (commands API). */
		if (pss && pss->collecting && !pss->too_large && in && len) {
			if (pss->reqbody.len + len > MAX_REQUEST_BODY)
				pss->too_large = true;
			else
				hub_buf_append(&pss->reqbody, in, len);
		}
		return 0;
	case LWS_CALLBACK_HTTP_BODY_COMPLETION:
		return pss ? body_done(wsi, pss) : 0;
	case LWS_CALLBACK_HTTP_WRITEABLE:
		if (pss && pss->rq)
			return req_writeable(wsi, pss);
		if (!pss || !pss->body.data)
			return 0;
		return write_body(wsi, pss);
	case LWS_CALLBACK_CLOSED_HTTP:
		if (pss) {
			hub_buf_free(&pss->body);
			hub_buf_free(&pss->reqbody);
			hub_buf_free(&pss->qmem);
			req_detach(pss);
		}
		break;
	case LWS_CALLBACK_WSI_DESTROY:
		free_handshake(wsi);
		if (pss) {
			hub_buf_free(&pss->body);
			hub_buf_free(&pss->reqbody);
			hub_buf_free(&pss->qmem);
			req_detach(pss);
		}
		break;
	default:
		break;
	}
	return lws_callback_http_dummy(wsi, reason, user, in, len);
}

const struct lws_protocols hub_http_protocol = {
	"http", http_callback, sizeof(struct http_pss), 0, 0, NULL, 0
};
