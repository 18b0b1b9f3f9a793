/*
 * http.h - HTTP on the hub's port: protocols[0] of the lws vhost. It owns
 * every connection until a WebSocket upgrade, and offers the modules two
 * registrations and one request object:
 *
 *  - routes: a module lists its HTTP routes {method, pattern, auth, scopes,
 *    handler} in a static table (hub_http_add_routes). http.c matches each
 *    request against every table, answers 404/405 itself, checks the API key
 *    and its scopes in one place (401/403), collects a POST's body (64 KiB at
 *    most, 413 beyond) and calls the handler with a struct hub_req.
 *  - upgrades: a module names its WebSocket endpoint {path, subprotocol,
 *    confirm} (hub_http_add_upgrade); http.c checks the path and that the
 *    subprotocol lws will bind is that one, then calls confirm, which
 *    authenticates (or refuses with hub_http_refuse_upgrade).
 *  - struct hub_req: one HTTP request answered synchronously or later from
 *    Redis callbacks: a refcounted heap object referenced by the connection
 *    and by every pending callback. When the client goes away the request
 *    turns hub_req_gone() and the last reference frees it. Every hub_req_*
 *    call is safe from a Redis reply callback and from `drained`.
 *
 * Connection-level limits (header size, deadlines, pipelining) are in
 * docs/protocol.md "HTTP on the same port". Loop thread only.
 */
#ifndef HUB_HTTP_H
#define HUB_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <libwebsockets.h>

#include "hub/auth.h"

struct hub;
struct hub_module;
struct hub_req;
struct redisReply;

/* The module (hub/module.h): first in the table, protocols[0]. */
extern const struct hub_module hub_http_module;

/* Request line plus headers: lws holds at most this much of a request's
 * header block (max_http_header_data); a larger one is answered 431. */
#define HUB_HTTP_HEADER_MAX 16384
/* The URL's path and its query, each: 414 beyond. */
#define HUB_HTTP_URI_MAX 4096
/* A request body: 413 beyond. */
#define HUB_HTTP_BODY_MAX (64 * 1024)

/* ---- routes ---------------------------------------------------------------- */

/* Query-string arguments, URL-decoded by lws, in request order. */
#define HUB_QUERY_MAX 32
struct hub_query {
	size_t n;
	const char *name[HUB_QUERY_MAX];
	const char *value[HUB_QUERY_MAX]; /* "" for `name` without `=` */
};

/* The value of the first argument called name, or NULL (also for q NULL). */
const char *hub_query_get(const struct hub_query *q, const char *name);

/* What a handler gets, borrowed for the call (copy what is needed later). */
#define HUB_ROUTE_PARAMS 2
struct hub_route_args {
	const char *param[HUB_ROUTE_PARAMS]; /* the path's {} segments, in order */
	const struct hub_query *query;
	const char *body;                    /* POST: the whole body, "" if none */
	size_t body_len;
	const char *idempotency_key;         /* the Idempotency-Key header, or NULL */
	void *ctx;                           /* given to hub_http_add_routes */
};

typedef void (*hub_route_fn)(struct hub_req *rq, const struct hub_route_args *a);

enum hub_route_auth {
	HUB_ROUTE_PUBLIC,     /* no credentials (health, metrics, the API document) */
	HUB_ROUTE_KEY,        /* an API key from the api-keys file */
};

struct hub_route {
	const char *method;   /* "GET" or "POST" (a POST's body is collected) */
	const char *pattern;  /* "/v1/devices/{}/telemetry": {} is one path segment */
	enum hub_route_auth auth;
	unsigned scopes;      /* HUB_ROUTE_KEY: the key needs one of these
			       * AUTH_SCOPE_* bits (admin has all); 0 = any key */
	hub_route_fn fn;
};

/* Registers a module's routes (the table is borrowed: static) with the ctx
 * its handlers get. At start-up, before the loop runs. */
void hub_http_add_routes(struct hub *hub, const struct hub_route *routes, size_t n,
			 void *ctx);

/* The handler of GET requests no route matched (the browser dashboard's
 * files), or NULL. */
void hub_http_set_fallback(struct hub *hub, hub_route_fn fn, void *ctx);

/* Calls fn for the request counts of every route, then of the static files
 * and of the requests no route took (GET /metrics). */
struct hub_route_stat;
void hub_http_each_route_stat(const struct hub *hub,
			      void (*fn)(const struct hub_route_stat *s, void *arg), void *arg);

/* ---- WebSocket upgrades -------------------------------------------------- */

/* What an accepted upgrade hands to its protocol's ESTABLISHED. */
struct hub_handshake {
	auth_principal who;        /* moved in by confirm */
	bool anonymous;            /* no credentials yet (a dashboard's auth message) */
};

/* Called from LWS_CALLBACK_HTTP_CONFIRM_UPGRADE once the path and the
 * subprotocol fit. Fills hs and returns 0 to accept, or returns what
 * hub_http_refuse_upgrade() returned. */
typedef int (*hub_upgrade_fn)(struct lws *wsi, struct hub *hub, struct hub_handshake *hs,
			      void *ctx);

/* path and subprotocol are borrowed (static). Start-up only. */
void hub_http_add_upgrade(struct hub *hub, const char *path, const char *subprotocol,
			  hub_upgrade_fn confirm, void *ctx);

/* From the protocol's LWS_CALLBACK_ESTABLISHED: moves the handshake of
 * wsi's upgrade into out when that upgrade was to path. False otherwise
 * (refuse the connection): only an upgrade confirmed for this endpoint may
 * bind its protocol. */
bool hub_http_take_handshake(struct lws *wsi, const char *path, struct hub_handshake *out);

/* Answers an upgrade with status and {"error":{code,message}}, HTTP/1.1,
 * `Connection: close` (401 with WWW-Authenticate). Returns the value the
 * confirm callback returns to lws. */
int hub_http_refuse_upgrade(struct lws *wsi, unsigned status, const char *code,
			    const char *message);

/* The credential of `Authorization: Bearer <credential>`, copied into buf
 * (HUB_AUTHZ_MAX + 16 bytes); *cred points into buf. */
#define HUB_AUTHZ_MAX 8192
enum hub_bearer { HUB_BEARER_OK, HUB_BEARER_NONE, HUB_BEARER_TOO_LONG, HUB_BEARER_BAD };
enum hub_bearer hub_http_bearer(struct lws *wsi, char *buf, size_t size, const char **cred,
				size_t *len);
/* The 401 message for a bearer that is not OK. */
const char *hub_http_bearer_problem(enum hub_bearer b);

/* ---- the request ----------------------------------------------------------- */

struct hub *hub_req_hub(const struct hub_req *rq);
/* The API key the request was authorized with (owned by rq; empty for a
 * public route). */
const auth_principal *hub_req_who(const struct hub_req *rq);
/* The client's address as text ("" when unknown). */
const char *hub_req_peer(const struct hub_req *rq);
/* True once the client has gone (or the request was answered or aborted):
 * nothing more can be sent. */
bool hub_req_gone(const struct hub_req *rq);

void hub_req_ref(struct hub_req *rq);
/* Frees rq (and its ctx, with the ctx_free given) with the last reference. */
void hub_req_unref(struct hub_req *rq);

/* Adds a response header ("retry-after:", "x-cache:": lower case, with
 * the colon) to the answer not yet started. At most 256 bytes of them per
 * request; -1 beyond or once the answer has started. */
int hub_req_add_header(struct hub_req *rq, const char *name, const char *value);

/* Per-route state, freed with rq. */
void hub_req_set_ctx(struct hub_req *rq, void *ctx, void (*ctx_free)(void *));
void *hub_req_ctx(const struct hub_req *rq);

/* A whole response: takes body[0..len) (copied). Once per request. */
void hub_req_respond(struct hub_req *rq, unsigned status, const char *ctype,
		     const char *body, size_t len);
/* {"error":{"code","message"[,"field"]}} with status. field may be NULL. */
void hub_req_error(struct hub_req *rq, unsigned status, const char *code,
		   const char *field, const char *message);
/* 503 `unavailable`: Redis did not answer (or the command could not go). */
void hub_req_unavailable(struct hub_req *rq);
/* A reply a handler cannot use: 503 when r is NULL (Redis lost), else 500. */
void hub_req_redis_failed(struct hub_req *rq, const struct redisReply *r);

/* A streamed response (chunked transfer encoding). `drained` is called each
 * time everything queued so far has been written to the socket and the stream
 * is not ended: produce the next part from there (that is the backpressure:
 * at most what was queued since the last drain is buffered). */
typedef void (*hub_req_drained_cb)(struct hub_req *rq);
void hub_req_stream_begin(struct hub_req *rq, unsigned status, const char *ctype,
			  hub_req_drained_cb drained);
/* Queues data[0..len) as one chunk. With len 0 it queues nothing, but
 * drained is still called once the queue is (already) empty. */
void hub_req_stream_write(struct hub_req *rq, const char *data, size_t len);
/* Queues the last chunk; the request completes once it is written. */
void hub_req_stream_end(struct hub_req *rq);
/* Closes the connection (a stream that cannot be completed). */
void hub_req_abort(struct hub_req *rq);

/* ---- the loop's side ------------------------------------------------------- */

/* Sees every line lws logs before the hub's logger does; returns nonzero
 * when the line is one the HTTP module acts on and should not be logged as
 * an lws error (a request whose headers lws could not hold). */
int hub_http_lws_log(const char *line);

#endif
