/*
 * ops.c - health, readiness, metrics, the API document, the device types and
 * the dashboard's files (see ops.h). Each answer is whole and synchronous.
 */
#include "hub/ops.h"

#include <stdlib.h>
#include <string.h>
#include <jansson.h>

#include "hub/http.h"
#include "hub/hub.h"
#include "hub/exposition.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/util.h"
#include "protocols/schema.h"

/* docs/openapi.json, embedded at build time (cmake/embed.cmake). */
extern const unsigned char hub_openapi_json[];
extern const size_t hub_openapi_json_len;

static void respond_buf(struct hub_req *rq, unsigned status, const char *ctype, hub_buf *b)
{
	hub_req_respond(rq, status, ctype, b->data ? b->data : "", b->len);
	hub_buf_free(b);
}

static void on_healthz(struct hub_req *rq, const struct hub_route_args *a)
{
	static const char ok[] = "{\"status\":\"ok\"}";

	(void)a;
	hub_req_respond(rq, 200, "application/json", ok, sizeof(ok) - 1);
}

static void on_readyz(struct hub_req *rq, const struct hub_route_args *a)
{
	struct hub *hub = a->ctx;
	size_t schemas = hub->schemas ? schema_set_count(hub->schemas) : 0;
	bool redis = hub_redis_up(hub->redis);
	bool ready = redis && schemas > 0 && !hub->draining;
	hub_buf b = { 0 };

	hub_buf_printf(&b, "{\"status\":\"%s\",\"redis\":%s,\"schemas\":%zu,\"draining\":%s}",
		       ready ? "ready" : "not_ready", redis ? "true" : "false", schemas,
		       hub->draining ? "true" : "false");
	respond_buf(rq, ready ? 200 : 503, "application/json", &b);
}

static void on_metrics(struct hub_req *rq, const struct hub_route_args *a)
{
	hub_buf b = { 0 };

	hub_metrics_render(a->ctx, &b);
	respond_buf(rq, 200, "text/plain; version=0.0.4", &b);
}

static void on_openapi(struct hub_req *rq, const struct hub_route_args *a)
{
	(void)a;
	hub_req_respond(rq, 200, "application/json", (const char *)hub_openapi_json,
			hub_openapi_json_len);
}

static void on_device_types(struct hub_req *rq, const struct hub_route_args *a)
{
	struct hub *hub = a->ctx;
	hub_buf b = { 0 };

	hub_buf_puts(&b, "{\"device_types\":[");
	for (size_t i = 0; hub->schemas && i < schema_set_count(hub->schemas); i++) {
		char *s = json_dumps(schema_type_json(schema_set_at(hub->schemas, i)),
				     JSON_COMPACT);
		if (i)
			hub_buf_puts(&b, ",");
		hub_buf_puts(&b, s ? s : "null");
		free(s);
	}
	hub_buf_puts(&b, "]}");
	respond_buf(rq, 200, "application/json", &b);
}

/* The browser dashboard: files directly in web-root (no subdirectories, so
 * no path can climb out), "/" = index.html. Small files, read per request. */
static void serve_static(struct hub_req *rq, const struct hub_route_args *a)
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
	struct hub *hub = a->ctx;
	const char *path = a->param[0];
	const char *name = path[0] == '/' && path[1] ? path + 1 : "index.html";
	const char *ctype = NULL, *dot = strrchr(name, '.');
	char file[1024];
	size_t len;
	char *data;

	for (const char *c = name; *c; c++)
		if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
		      (*c >= '0' && *c <= '9') || *c == '-' || *c == '_' || *c == '.')) {
			hub_req_error(rq, 404, "not_found", NULL, "no such route");
			return;
		}
	for (size_t i = 0; dot && i < sizeof(types) / sizeof(types[0]); i++)
		if (!strcmp(dot, types[i].ext))
			ctype = types[i].type;
	if (name[0] == '.' || !ctype ||
	    (size_t)snprintf(file, sizeof(file), "%s/%s", hub->cfg.web_root, name) >= sizeof(file)) {
		hub_req_error(rq, 404, "not_found", NULL, "no such route");
		return;
	}
	data = hub_read_file(file, 4 * 1024 * 1024, &len);
	if (!data) {
		hub_req_error(rq, 404, "not_found", NULL, "no such file");
		return;
	}
	hub_req_respond(rq, 200, ctype, data, len);
	free(data);
}

static const struct hub_route routes[] = {
	{ "GET", "/healthz", HUB_ROUTE_PUBLIC, 0, on_healthz },
	{ "GET", "/readyz", HUB_ROUTE_PUBLIC, 0, on_readyz },
	{ "GET", "/metrics", HUB_ROUTE_PUBLIC, 0, on_metrics },
	{ "GET", "/v1/openapi.json", HUB_ROUTE_PUBLIC, 0, on_openapi },
	{ "GET", "/v1/device-types", HUB_ROUTE_KEY, AUTH_SCOPE_TELEMETRY_READ, on_device_types },
};

static int ops_start(struct hub *hub, char *err, size_t errlen)
{
	(void)err;
	(void)errlen;
	hub_http_add_routes(hub, routes, sizeof(routes) / sizeof(routes[0]), hub);
	if (hub->cfg.web_root)
		hub_http_set_fallback(hub, serve_static, hub);
	return 0;
}

const struct hub_module hub_ops_module = {
	.name = "ops",
	.start = ops_start,
};
