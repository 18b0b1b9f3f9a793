/*
 * api.h - the operator API's read routes over the registry and the telemetry
 * streams (CONTRACT §4): GET /v1/devices, /v1/devices/{device},
 * /v1/devices/{device}/telemetry. They answer from Redis reply callbacks.
 *
 * Two halves meet here:
 *  - http.c owns the connection and implements struct hub_req, one HTTP
 *    request answered asynchronously: a refcounted heap object referenced by
 *    the connection's pss and by every pending Redis callback. When the client
 *    goes away, http.c clears the request's wsi (hub_req_gone() turns true) and
 *    drops its reference; whoever drops the last reference frees it.
 *  - api.c parses and validates the route and its query, runs the Redis
 *    commands and answers through the hub_req_* calls. It has no lws include.
 *
 * Everything runs on the loop; every hub_req_* call is safe from a Redis reply
 * callback and from the drained callback.
 */
#ifndef HUB_API_H
#define HUB_API_H

#include <stdbool.h>
#include <stddef.h>

#include "hub/auth.h"

struct hub;
struct hub_req;

/* Query-string arguments, URL-decoded by lws, in request order. */
#define HUB_QUERY_MAX 32
struct hub_query {
	size_t n;
	const char *name[HUB_QUERY_MAX];
	const char *value[HUB_QUERY_MAX]; /* "" for `name` without `=` */
};

/* ---- implemented by http.c ------------------------------------------------ */

struct hub *hub_req_hub(const struct hub_req *rq);
/* The API key the request was authorized with (owned by rq). */
const auth_principal *hub_req_who(const struct hub_req *rq);
/* True once the client has gone (or the request was answered or aborted):
 * nothing more can be sent. */
bool hub_req_gone(const struct hub_req *rq);

void hub_req_ref(struct hub_req *rq);
/* Frees rq (and its ctx, with the ctx_free given) with the last reference. */
void hub_req_unref(struct hub_req *rq);

/* Per-route state, freed with rq. */
void hub_req_set_ctx(struct hub_req *rq, void *ctx, void (*ctx_free)(void *));
void *hub_req_ctx(const struct hub_req *rq);

/* A whole response: takes body[0..len) (copied). Once per request. */
void hub_req_respond(struct hub_req *rq, unsigned status, const char *ctype,
		     const char *body, size_t len);
/* {"error":{"code","message"[,"field"]}} with status. field may be NULL. */
void hub_req_error(struct hub_req *rq, unsigned status, const char *code,
		   const char *field, const char *message);

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

/* ---- implemented by api.c ------------------------------------------------- */

/* True for the paths api.c serves (GET only; the caller checks the method and
 * the telemetry:read scope first). */
bool hub_api_handles(const char *path);

/* Starts answering rq for path and query (both borrowed: copy what is needed
 * later). Answers errors at once; otherwise from Redis callbacks. */
void hub_api_handle(struct hub_req *rq, const char *path, const struct hub_query *q);

#endif
