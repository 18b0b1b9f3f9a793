#include "commands/cmd_api.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>

#include "commands/cmd_stats.h"
#include "commands/commands.h"
#include "hub/audit.h"
#include "hub/http.h"
#include "hub/hub.h"
#include "hub/ingest.h"
#include "hub/keys.h"
#include "hub/module.h"
#include "hub/log.h"
#include "hub/redis.h"
#include "hub/util.h"
#include "protocols/schema.h"
#include "hub_lua.h"

#define MAX_ERRS 4

/* ---- small helpers --------------------------------------------------------- */

static bool visible(struct hub_req *rq, const char *device)
{
	return auth_patterns_match(&hub_req_who(rq)->devices, device);
}

/* The tail of every asynchronous step: the reply callback owns a reference on
 * rq (taken here, after the call: callbacks never run before the loop does),
 * or Redis refused the command and the client hears 503 now. */
static void await_reply(struct hub_req *rq, int rc)
{
	if (rc)
		hub_req_unavailable(rq);
	else
		hub_req_ref(rq);
}

/* The {hash, list} answer of the get scripts, or NULL when the client is
 * gone or Redis failed (then answered 503). */
static const redisReply *pair_reply(struct hub_req *rq, const redisReply *r)
{
	if (hub_req_gone(rq))
		return NULL;
	if (!r || r->type != REDIS_REPLY_ARRAY || r->elements != 2) {
		hub_req_unavailable(rq);
		return NULL;
	}
	return r;
}

static const redisReply *kv_get(const redisReply *kv, const char *name)
{
	if (!kv || kv->type != REDIS_REPLY_ARRAY)
		return NULL;
	for (size_t i = 0; i + 1 < kv->elements; i += 2)
		if (kv->element[i]->type == REDIS_REPLY_STRING && !strcmp(kv->element[i]->str, name))
			return kv->element[i + 1]->type == REDIS_REPLY_STRING ? kv->element[i + 1] : NULL;
	return NULL;
}

/* A command as JSON from its hash (and its history when log is given). */
static void render(hub_buf *o, const redisReply *h, const redisReply *log)
{
	static const struct { const char *key, *out; char kind; } fields[] = {
		{ "id", "id", 's' }, { "device", "device", 's' }, { "type", "device_type", 's' },
		{ "name", "name", 's' }, { "params", "params", 'j' }, { "status", "status", 's' },
		{ "attempt", "attempt", 'n' }, { "max_attempts", "max_attempts", 'n' },
		{ "ack_timeout_s", "ack_timeout_s", 'n' }, { "timeout_s", "timeout_s", 'n' },
		{ "ttl_s", "ttl_s", 'n' }, { "created_at", "created_at", 'n' },
		{ "updated_at", "updated_at", 'n' }, { "expires_at", "expires_at", 'n' },
		{ "sent_at", "sent_at", 'n' }, { "deadline", "deadline", 'n' },
		{ "progress", "progress", 'n' }, { "message", "message", 's' },
		{ "result", "result", 'j' }, { "error", "error", 's' }, { "rollout", "rollout", 's' },
		{ "ignored_acks", "ignored_acks", 'c' }, { "last_ignored_ack", "last_ignored_ack", 'j' },
	};

	hub_buf_puts(o, "{");
	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
		const redisReply *v = kv_get(h, fields[i].key);
		if (i)
			hub_buf_puts(o, ",");
		hub_buf_printf(o, "\"%s\":", fields[i].out);
		if (fields[i].kind == 'c' && (!v || !v->len))
			hub_buf_puts(o, "0");
		else if (!v || (!v->len && fields[i].kind != 's') ||
		    (!v->len && !strcmp(fields[i].key, "rollout")))
			hub_buf_puts(o, fields[i].kind == 'j' && !strcmp(fields[i].key, "params") ? "{}" : "null");
		else if (fields[i].kind == 's')
			hub_buf_json_str(o, v->str, v->len);
		else
			hub_buf_append(o, v->str, v->len); /* stored as numbers / compact JSON */
	}
	if (log) {
		hub_buf_puts(o, ",\"history\":[");
		for (size_t i = 0; log->type == REDIS_REPLY_ARRAY && i < log->elements; i++) {
			if (i)
				hub_buf_puts(o, ",");
			hub_buf_append(o, log->element[i]->str, log->element[i]->len);
		}
		hub_buf_puts(o, "]");
	}
	hub_buf_puts(o, "}");
}

/* ---- per-request context --------------------------------------------------- */

struct ctx {
	char device[HUB_ID_MAX + 1];
	char id[CMD_ID_MAX + 1];
	unsigned status;             /* to answer with after a get */
	json_t *body;
	struct cmd_spec spec;
	char *params;
	char name[129];
	char idem[160];
	char owner[129];
	bool want_cancel;
	const char *rollout_action; /* pause, resume, cancel (a rollout) */
};

static void ctx_free(void *p)
{
	struct ctx *c = p;

	json_decref(c->body);
	free(c->params);
	free(c);
}

/* The audit entry of an operator action on a command or rollout: its
 * device (or the rollout's target) and name. */
static void audit_command(struct hub_req *rq, const char *action, const struct ctx *c)
{
	json_t *d = json_object();
	char *s;

	if (c->device[0])
		json_object_set_new(d, "device", json_string(c->device));
	if (c->name[0])
		json_object_set_new(d, "name", json_string(c->name));
	s = json_dumps(d, JSON_COMPACT);
	json_decref(d);
	hub_audit(hub_req_hub(rq), rq, action, c->id, s);
	free(s);
}

static struct ctx *ctx_new(struct hub_req *rq)
{
	struct ctx *c = hub_xcalloc(1, sizeof(*c));

	hub_req_set_ctx(rq, c, ctx_free);
	return c;
}

static void cancel_now(struct hub_req *rq);

/* ---- GET /v1/commands/{id} and the answers of create/cancel ---------------- */

static void on_get(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct ctx *c = hub_req_ctx(rq);
	const redisReply *h, *dev;
	hub_buf o = { 0 };

	if (!pair_reply(rq, r))
		goto out;
	h = r->element[0];
	dev = kv_get(h, "device");
	if (!h->elements || !dev || !visible(rq, dev->str)) {
		hub_req_error(rq, 404, "not_found", NULL, "no such command");
		goto out;
	}
	if (c->want_cancel) {
		/* Visible: now cancel it. */
		c->want_cancel = false;
		snprintf(c->device, sizeof(c->device), "%s", dev->str);
		cancel_now(rq);
		goto out;
	}
	render(&o, h, r->element[1]);
	hub_req_respond(rq, c->status ? c->status : 200, "application/json", o.data, o.len);
	hub_buf_free(&o);
out:
	hub_req_unref(rq);
}

static void get_and_answer(struct hub_req *rq, const char *id, unsigned status)
{
	struct ctx *c = hub_req_ctx(rq);

	c->status = status;
	await_reply(rq, cmd_get(hub_req_hub(rq), id, on_get, rq));
}

/* ---- cancel ---------------------------------------------------------------- */

static void on_canceled(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct ctx *c = hub_req_ctx(rq);
	long long kind;

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY || !r->elements ||
	    r->element[0]->type != REDIS_REPLY_INTEGER) {
		hub_req_unavailable(rq);
		goto out;
	}
	kind = r->element[0]->integer;
	if (kind == -1) {
		hub_req_error(rq, 404, "not_found", NULL, "no such command");
	} else if (kind == 0) {
		char msg[96];
		snprintf(msg, sizeof(msg), "the command is already %s",
			 r->elements > 1 && r->element[1]->type == REDIS_REPLY_STRING ? r->element[1]->str : "final");
		hub_req_error(rq, 409, "conflict", NULL, msg);
	} else {
		const char *was = r->elements > 1 && r->element[1]->type == REDIS_REPLY_STRING ?
				  r->element[1]->str : "";
		if (strcmp(was, "queued"))
			cmd_route_cancel(hub_req_hub(rq), c->id, c->device);
		hub_metrics_command_final(&hub_req_hub(rq)->metrics, "canceled");
		audit_command(rq, "command.cancel", c);
		get_and_answer(rq, c->id, 200);
	}
out:
	hub_req_unref(rq);
}

static void cancel_now(struct hub_req *rq)
{
	struct ctx *c = hub_req_ctx(rq);

	await_reply(rq, cmd_cancel(hub_req_hub(rq), c->id, on_canceled, rq));
}

/* ---- create ---------------------------------------------------------------- */

static void on_created(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct ctx *c = hub_req_ctx(rq);
	long long kind;

	if (!r || r->type != REDIS_REPLY_ARRAY || !r->elements ||
	    r->element[0]->type != REDIS_REPLY_INTEGER) {
		if (!hub_req_gone(rq))
			hub_req_unavailable(rq);
		goto out;
	}
	kind = r->element[0]->integer;
	if (kind == 1) {
		struct hub *hub = hub_req_hub(rq);
		const char *inst = r->elements > 3 && r->element[3]->type == REDIS_REPLY_STRING ?
				   r->element[3]->str : "";
		bool online = r->elements > 4 && r->element[4]->type == REDIS_REPLY_STRING &&
			      !strcmp(r->element[4]->str, "1");
		hub->metrics.commands_created_total++;
		cmd_track(hub, c->id, r->elements > 2 && r->element[2]->type == REDIS_REPLY_INTEGER ?
				      r->element[2]->integer : 0);
		cmd_route(hub, c->id, c->device, inst, online);
		audit_command(rq, "command.create", c);
		if (!hub_req_gone(rq))
			get_and_answer(rq, c->id, 201);
	} else if (kind == 0 && r->elements > 1 && r->element[1]->type == REDIS_REPLY_STRING) {
		if (!hub_req_gone(rq))
			get_and_answer(rq, r->element[1]->str, 200); /* the first command */
	} else if (!hub_req_gone(rq)) {
		hub_req_error(rq, 404, "unknown_device", NULL,
			      "no such device (it must have been announced at least once)");
	}
out:
	hub_req_unref(rq);
}

/* Checks the body's params against the command's schema (422 naming the
 * first bad field) and keeps them as compact JSON in c->params. */
static int validate_params(struct hub_req *rq, const schema_node *node, struct ctx *c)
{
	json_t *params = json_object_get(c->body, "params");
	schema_error errs[MAX_ERRS];
	int n;

	params = params && !json_is_null(params) ? json_incref(params) : json_object();
	n = schema_validate(node, params, "params", errs, MAX_ERRS);
	if (n) {
		char msg[300];
		snprintf(msg, sizeof(msg), "%s %s", errs[0].path, errs[0].message);
		hub_req_error(rq, 422, "invalid", errs[0].path, msg);
	} else {
		c->params = json_dumps(params, JSON_COMPACT | JSON_SORT_KEYS);
	}
	json_decref(params);
	return n ? -1 : 0;
}

static void on_device_type(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct ctx *c = hub_req_ctx(rq);
	struct hub *hub = hub_req_hub(rq);
	const schema_type *t;
	const schema_node *node;

	if (hub_req_gone(rq))
		goto out;
	if (!r) {
		hub_req_unavailable(rq);
		goto out;
	}
	if (r->type != REDIS_REPLY_STRING) {
		hub_req_error(rq, 404, "unknown_device", NULL,
			      "no such device (it must have been announced at least once)");
		goto out;
	}
	t = schema_set_find(hub->schemas, r->str, r->len);
	if (!t) {
		hub_req_error(rq, 422, "invalid", "name", "the device's type is not loaded on this hub");
		goto out;
	}
	node = schema_type_command(t, c->name);
	if (!node) {
		char msg[256];
		snprintf(msg, sizeof(msg), "device type %.64s has no command \"%.64s\"",
			 schema_type_name(t), c->name);
		hub_req_error(rq, 422, "invalid", "name", msg);
		goto out;
	}
	if (validate_params(rq, node, c))
		goto out;
	cmd_new_id_for(c->id, c->device);
	c->spec.id = c->id;
	c->spec.device = c->device;
	c->spec.type = schema_type_name(t);
	c->spec.name = c->name;
	c->spec.params = c->params;
	c->spec.idem = c->idem[0] ? c->idem : NULL;
	c->spec.owner = c->owner;
	await_reply(rq, cmd_create(hub, &c->spec, on_created, rq));
out:
	hub_req_unref(rq);
}

static int int_field_in(struct hub_req *rq, json_t *body, const char *prefix, const char *name,
			int def, int min, int max, int *out)
{
	json_t *v = json_object_get(body, name);
	char msg[160], field[64];

	snprintf(field, sizeof(field), "%s%s", prefix, name);

	if (!v || json_is_null(v)) {
		*out = def;
		return 0;
	}
	if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max) {
		snprintf(msg, sizeof(msg), "%s must be an integer from %d to %d", field, min, max);
		hub_req_error(rq, 422, "invalid", field, msg);
		return -1;
	}
	*out = (int)json_integer_value(v);
	return 0;
}

static int int_field(struct hub_req *rq, json_t *body, const char *name, int def, int min,
		     int max, int *out)
{
	return int_field_in(rq, body, "", name, def, min, max, out);
}

/* The request's JSON object body in a new request context, or NULL after
 * answering 422. */
static struct ctx *body_ctx(struct hub_req *rq, const char *body, size_t len)
{
	json_error_t jerr;
	json_t *b = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
	struct ctx *c;

	if (!json_is_object(b)) {
		json_decref(b);
		hub_req_error(rq, 422, "invalid", "body", "the body must be a JSON object");
		return NULL;
	}
	c = ctx_new(rq);
	c->body = b;
	return c;
}

/* ack_timeout_s, timeout_s, ttl_s, max_attempts with their defaults. */
static int timing_fields(struct hub_req *rq, json_t *b, struct cmd_spec *sp)
{
	return int_field(rq, b, "ack_timeout_s", 10, 1, 3600, &sp->ack_timeout_s) ||
	       int_field(rq, b, "timeout_s", 300, 1, 604800, &sp->timeout_s) ||
	       int_field(rq, b, "ttl_s", 3600, 1, 2592000, &sp->ttl_s) ||
	       int_field(rq, b, "max_attempts", 3, 1, 100, &sp->max_attempts) ? -1 : 0;
}

static void create(struct hub_req *rq, const char *device, const char *body, size_t len,
		   const char *idem)
{
	struct ctx *c;
	json_t *b, *name, *params;
	char key[HUB_KEY_MAX];
	const char *argv[3] = { "HGET", key, "type" };

	if (!visible(rq, device)) {
		hub_req_error(rq, 404, "unknown_device", NULL, "no such device");
		return;
	}
	if (idem && (strlen(idem) > 128 || !*idem)) {
		hub_req_error(rq, 422, "invalid", "Idempotency-Key", "Idempotency-Key must be 1 to 128 characters");
		return;
	}
	for (const char *p = idem; p && *p; p++)
		if (*p < 0x21 || *p > 0x7e) {
			hub_req_error(rq, 422, "invalid", "Idempotency-Key",
				      "Idempotency-Key must be printable ASCII without spaces");
			return;
		}
	if (!(c = body_ctx(rq, body, len)))
		return;
	b = c->body;
	snprintf(c->device, sizeof(c->device), "%s", device);
	name = json_object_get(b, "name");
	if (!json_is_string(name) || !json_string_length(name) || json_string_length(name) > 128) {
		hub_req_error(rq, 422, "invalid", "name", "name must be the name of a command (a string)");
		return;
	}
	snprintf(c->name, sizeof(c->name), "%s", json_string_value(name));
	params = json_object_get(b, "params");
	if (params && !json_is_object(params) && !json_is_null(params)) {
		hub_req_error(rq, 422, "invalid", "params", "params must be an object");
		return;
	}
	if (timing_fields(rq, b, &c->spec))
		return;
	snprintf(c->idem, sizeof(c->idem), "%s", idem ? idem : "");
	snprintf(c->owner, sizeof(c->owner), "%s", hub_req_who(rq)->name);
	hub_key_dev(key, sizeof(key), device);   /* the route checked the id */
	await_reply(rq, hub_redis_command_argv(hub_req_hub(rq)->redis, on_device_type, rq, 3, argv, NULL));
}

/* ---- list ------------------------------------------------------------------ */

static void on_list(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	hub_buf o = { 0 };

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		hub_req_unavailable(rq);
		goto out;
	}
	hub_buf_puts(&o, "{\"commands\":[");
	for (size_t i = 0; i < r->elements; i++) {
		if (i)
			hub_buf_puts(&o, ",");
		render(&o, r->element[i], NULL);
	}
	hub_buf_puts(&o, "]}");
	hub_req_respond(rq, 200, "application/json", o.data, o.len);
	hub_buf_free(&o);
out:
	hub_req_unref(rq);
}

static void list(struct hub_req *rq, const char *device, const struct hub_query *q)
{
	const char *status = hub_query_get(q, "status"), *lim = hub_query_get(q, "limit");
	int64_t limit = 100;

	if (!visible(rq, device)) {
		hub_req_error(rq, 404, "unknown_device", NULL, "no such device");
		return;
	}
	if (status && !cmd_state_valid(status)) {
		hub_req_error(rq, 422, "invalid", "status", "status must be one of the ten command states");
		return;
	}
	if (lim && hub_parse_i64(lim, strlen(lim), 1, 1000, &limit)) {
		hub_req_error(rq, 422, "invalid", "limit", "limit must be an integer from 1 to 1000");
		return;
	}
	await_reply(rq, cmd_list(hub_req_hub(rq), device, status, (int)limit, on_list, rq));
}

/* ---- fleet rollouts -------------------------------------------------------- */

/* A key limited to device patterns sees only the rollouts it created (their
 * targets were narrowed to its patterns); an unrestricted key sees all. */
static bool rollout_visible(struct hub_req *rq, const redisReply *owner)
{
	const auth_principal *who = hub_req_who(rq);

	return who->devices.all || (owner && !strcmp(owner->str, who->name));
}

static void on_rollout(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct ctx *c = hub_req_ctx(rq);
	const redisReply *h, *counts;
	hub_buf o = { 0 };
	static const struct { const char *key; char kind; } fields[] = {
		{ "id", 's' }, { "status", 's' }, { "device_type", 's' }, { "labels", 'j' },
		{ "name", 's' }, { "params", 'j' }, { "max_per_minute", 'n' },
		{ "abort_failure_ratio", 'n' }, { "min_finished", 'n' }, { "total", 'n' },
		{ "released", 'n' }, { "created_at", 'n' }, { "updated_at", 'n' },
		{ "online_only", 'b' },
	};

	if (!pair_reply(rq, r))
		goto out;
	h = r->element[0];
	counts = r->element[1];
	if (!h->elements || !rollout_visible(rq, kv_get(h, "owner"))) {
		hub_req_error(rq, 404, "not_found", NULL, "no such rollout");
		goto out;
	}
	hub_buf_puts(&o, "{");
	for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++) {
		const redisReply *v = kv_get(h, fields[i].key);
		if (i)
			hub_buf_puts(&o, ",");
		hub_buf_printf(&o, "\"%s\":", fields[i].key);
		if (fields[i].kind == 'b')
			hub_buf_puts(&o, v && v->len == 1 && v->str[0] == '1' ? "true" : "false");
		else if (!v || !v->len)
			hub_buf_puts(&o, "null");
		else if (fields[i].kind == 's')
			hub_buf_json_str(&o, v->str, v->len);
		else
			hub_buf_append(&o, v->str, v->len);
	}
	hub_buf_puts(&o, ",\"counts\":{");
	for (size_t i = 0; counts->type == REDIS_REPLY_ARRAY && i + 1 < counts->elements; i += 2) {
		if (i)
			hub_buf_puts(&o, ",");
		const redisReply *n = counts->element[i + 1];
		hub_buf_json_str(&o, counts->element[i]->str, counts->element[i]->len);
		if (n->type == REDIS_REPLY_INTEGER)
			hub_buf_printf(&o, ":%lld", n->integer);
		else /* counted by the hub (a cluster: hub/lua/rollout_get.lua) */
			hub_buf_printf(&o, ":%lld", strtoll(n->str ? n->str : "0", NULL, 10));
	}
	hub_buf_puts(&o, "}}");
	hub_req_respond(rq, c->status ? c->status : 200, "application/json", o.data, o.len);
	hub_buf_free(&o);
out:
	hub_req_unref(rq);
}

static void rollout_answer(struct hub_req *rq, unsigned status)
{
	struct ctx *c = hub_req_ctx(rq);

	c->status = status;
	await_reply(rq, cmd_rollout_get(hub_req_hub(rq), c->id, on_rollout, rq));
}

static void on_rollout_created(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct ctx *c = hub_req_ctx(rq);

	if (!r || r->type != REDIS_REPLY_INTEGER) {
		if (r && r->type == REDIS_REPLY_ERROR)
			hub_err("rollout create failed: %s", r->str);
		if (!hub_req_gone(rq))
			hub_req_unavailable(rq);
		goto out;
	}
	hub_req_hub(rq)->metrics.commands_created_total += (uint64_t)r->integer;
	cmd_rollout_kick(hub_req_hub(rq), c->id);
	audit_command(rq, "rollout.create", c);
	if (!hub_req_gone(rq))
		rollout_answer(rq, 202);
out:
	hub_req_unref(rq);
}

static void fleet_create(struct hub_req *rq, const char *body, size_t len)
{
	struct hub *hub = hub_req_hub(rq);
	const auth_principal *who = hub_req_who(rq);
	json_t *b, *target, *type, *labels, *name, *ro, *v;
	const schema_type *t;
	const schema_node *node;
	struct ctx *c;
	int mpm = 60, min_finished = 1;
	bool online_only = false;
	double ratio = 1.0;
	char *labels_s = NULL, *pats_s = NULL;

	if (!(c = body_ctx(rq, body, len)))
		return;
	b = c->body;
	target = json_object_get(b, "target");
	type = json_object_get(target, "device_type");
	labels = json_object_get(target, "labels");
	if (!json_is_object(target)) {
		hub_req_error(rq, 422, "invalid", "target", "target must be an object with device_type");
		return;
	}
	if (!json_is_string(type) || !(t = schema_set_find(hub->schemas, json_string_value(type),
							   json_string_length(type)))) {
		hub_req_error(rq, 422, "invalid", "target.device_type", "target.device_type must name a loaded device type");
		return;
	}
	if (labels && !json_is_null(labels)) {
		const char *k;
		if (!json_is_object(labels)) {
			hub_req_error(rq, 422, "invalid", "target.labels", "target.labels must be an object of strings");
			return;
		}
		json_object_foreach(labels, k, v)
			if (!json_is_string(v)) {
				hub_req_error(rq, 422, "invalid", "target.labels", "target.labels must be an object of strings");
				return;
			}
		if (json_object_size(labels))
			labels_s = json_dumps(labels, JSON_COMPACT);
	}
	name = json_object_get(b, "name");
	if (!json_is_string(name) || !(node = schema_type_command(t, json_string_value(name)))) {
		hub_req_error(rq, 422, "invalid", "name", "name must be a command of the target device type");
		free(labels_s);
		return;
	}
	snprintf(c->name, sizeof(c->name), "%s", json_string_value(name));
	if (validate_params(rq, node, c)) {
		free(labels_s);
		return;
	}
	if (timing_fields(rq, b, &c->spec)) {
		free(labels_s);
		return;
	}
	ro = json_object_get(b, "rollout");
	if (ro && !json_is_null(ro)) {
		if (!json_is_object(ro) ||
		    int_field_in(rq, ro, "rollout.", "max_per_minute", 60, 1, 1000000, &mpm) ||
		    int_field_in(rq, ro, "rollout.", "min_finished", 1, 1, 1000000, &min_finished)) {
			if (!json_is_object(ro))
				hub_req_error(rq, 422, "invalid", "rollout", "rollout must be an object");
			free(labels_s);
			return;
		}
		v = json_object_get(ro, "abort_failure_ratio");
		if (v && !json_is_null(v)) {
			if (!json_is_number(v) || json_number_value(v) < 0 || json_number_value(v) > 1) {
				hub_req_error(rq, 422, "invalid", "rollout.abort_failure_ratio",
					      "rollout.abort_failure_ratio must be a number from 0 to 1");
				free(labels_s);
				return;
			}
			ratio = json_number_value(v);
		}
		v = json_object_get(ro, "online_only");
		if (v && !json_is_null(v)) {
			if (!json_is_boolean(v)) {
				hub_req_error(rq, 422, "invalid", "rollout.online_only",
					      "rollout.online_only must be true or false");
				free(labels_s);
				return;
			}
			online_only = json_is_true(v);
		}
	}
	if (!who->devices.all) {
		json_t *arr = json_array();
		for (size_t i = 0; i < who->devices.n; i++)
			json_array_append_new(arr, json_string(who->devices.items[i]));
		pats_s = json_dumps(arr, JSON_COMPACT);
		json_decref(arr);
	}
	cmd_new_rollout_id(c->id);
	c->spec.id = c->id;
	c->spec.type = schema_type_name(t);
	c->spec.name = c->name;
	c->spec.params = c->params;
	c->spec.owner = who->name;
	await_reply(rq, cmd_rollout_create(hub, &c->spec, labels_s, pats_s, mpm, ratio, min_finished,
			       online_only, on_rollout_created, rq));
	free(labels_s);
	free(pats_s);
}

/* ---- routes ------------------------------------------------------------------
 * hub/http.c has checked the key's scope; each route checks Redis (503
 * while it is down), then its ids (an invalid one is answered like one that
 * does not exist). */

static bool redis_up(struct hub_req *rq)
{
	if (hub_redis_up(hub_req_hub(rq)->redis))
		return true;
	hub_req_unavailable(rq);
	return false;
}

static const char *route_device(struct hub_req *rq, const struct hub_route_args *a)
{
	const char *id = a->param[0];

	if (!redis_up(rq))
		return NULL;
	if (!hub_id_valid(id, strlen(id)) || !visible(rq, id)) {
		hub_req_error(rq, 404, "not_found", NULL, "no such device");
		return NULL;
	}
	return id;
}

/* The command (or rollout) of the route, in a new ctx; NULL when answered. */
static struct ctx *route_command(struct hub_req *rq, const struct hub_route_args *a)
{
	struct ctx *c;

	if (!redis_up(rq))
		return NULL;
	if (!cmd_id_valid(a->param[0])) {
		hub_req_error(rq, 404, "not_found", NULL, "no such command");
		return NULL;
	}
	c = ctx_new(rq);
	snprintf(c->id, sizeof(c->id), "%s", a->param[0]);
	return c;
}

static void on_device_create(struct hub_req *rq, const struct hub_route_args *a)
{
	const char *device = route_device(rq, a);

	if (device)
		create(rq, device, a->body, a->body_len, a->idempotency_key);
}

static void on_device_list(struct hub_req *rq, const struct hub_route_args *a)
{
	const char *device = route_device(rq, a);

	if (device)
		list(rq, device, a->query);
}

static void on_fleet_create(struct hub_req *rq, const struct hub_route_args *a)
{
	if (redis_up(rq))
		fleet_create(rq, a->body, a->body_len);
}

static void on_get_one(struct hub_req *rq, const struct hub_route_args *a)
{
	struct ctx *c = route_command(rq, a);

	if (!c)
		return;
	if (!strncmp(c->id, "r_", 2))
		rollout_answer(rq, 200);
	else
		get_and_answer(rq, c->id, 200);
}

/* ---- pause, resume, cancel of a rollout ------------------------------------------ */

static void on_rollout_ctl(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct ctx *c = hub_req_ctx(rq);
	struct hub *hub = hub_req_hub(rq);
	const char *action = c->rollout_action;

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY || !r->elements ||
	    r->element[0]->type != REDIS_REPLY_INTEGER) {
		hub_req_unavailable(rq);
		goto out;
	}
	if (r->element[0]->integer == -1) {
		hub_req_error(rq, 404, "not_found", NULL, "no such rollout");
	} else if (r->element[0]->integer == 0) {
		char msg[96];
		snprintf(msg, sizeof(msg), "the rollout is %s: it cannot be %s",
			 r->elements > 1 && r->element[1]->type == REDIS_REPLY_STRING ?
			 r->element[1]->str : "finished",
			 !strcmp(action, "pause") ? "paused" : !strcmp(action, "resume") ? "resumed" :
			 "canceled");
		hub_req_error(rq, 409, "conflict", NULL, msg);
	} else {
		char what[32];
		snprintf(what, sizeof(what), "rollout.%s", action);
		hub_audit(hub, rq, what, c->id, NULL);
		cmd_rollout_kick(hub, c->id); /* a cancel finishes in this step */
		rollout_answer(rq, 200);
	}
out:
	hub_req_unref(rq);
}

static void on_rollout_owner(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct ctx *c = hub_req_ctx(rq);

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type == REDIS_REPLY_ERROR) {
		hub_req_unavailable(rq);
		goto out;
	}
	if (r->type != REDIS_REPLY_STRING || !rollout_visible(rq, r)) {
		hub_req_error(rq, 404, "not_found", NULL, "no such rollout");
		goto out;
	}
	await_reply(rq, cmd_rollout_ctl(hub_req_hub(rq), c->id, c->rollout_action, on_rollout_ctl, rq));
out:
	hub_req_unref(rq);
}

/* Reads the rollout's owner (a key limited to device patterns acts only on
 * its own rollouts), then changes its status. */
static void rollout_control(struct hub_req *rq, struct ctx *c, const char *action)
{
	char key[HUB_KEY_MAX];
	const char *argv[3] = { "HGET", key, "owner" };

	c->rollout_action = action;
	if (!hub_key_rollout(key, sizeof(key), c->id)) {
		hub_req_error(rq, 404, "not_found", NULL, "no such rollout");
		return;
	}
	await_reply(rq, hub_redis_command_argv(hub_req_hub(rq)->redis, on_rollout_owner, rq, 3,
					       argv, NULL));
}

static void on_cancel(struct hub_req *rq, const struct hub_route_args *a)
{
	struct ctx *c = route_command(rq, a);

	if (!c)
		return;
	if (!strncmp(c->id, "r_", 2)) {
		rollout_control(rq, c, "cancel");
		return;
	}
	c->want_cancel = true;
	get_and_answer(rq, c->id, 200);
}

static void rollout_only(struct hub_req *rq, const struct hub_route_args *a, const char *action)
{
	struct ctx *c = route_command(rq, a);

	if (!c)
		return;
	if (strncmp(c->id, "r_", 2)) {
		hub_req_error(rq, 404, "not_found", NULL, "only a rollout can be paused or resumed");
		return;
	}
	rollout_control(rq, c, action);
}

static void on_pause(struct hub_req *rq, const struct hub_route_args *a)
{
	rollout_only(rq, a, "pause");
}

static void on_resume(struct hub_req *rq, const struct hub_route_args *a)
{
	rollout_only(rq, a, "resume");
}

#define READ (AUTH_SCOPE_TELEMETRY_READ | AUTH_SCOPE_COMMANDS_WRITE)
#define WRITE AUTH_SCOPE_COMMANDS_WRITE

/* ---- DELETE /v1/devices/{device}: decommission --------------------------------
 * Reads the device's type, cancels its pending commands (as POST .../cancel
 * does, the gateway told where it had them), then removes it from the
 * registry in one call (hub/lua/decommission.lua), tells the instance that
 * holds it to stop storing its readings (a devtake notice naming no
 * connection), and with ?purge=true deletes its readings in every ingest
 * shard and its command log. docs/admin-api.md. */

struct cmd_api {
	int script_decommission;
	struct cmd_stats *stats;    /* commands/cmd_stats.h */
};

struct decom {
	const struct cmd_api *ca;
	char device[HUB_ID_MAX + 1];
	char type[HUB_ID_MAX + 1];
	bool purge;
	unsigned pending;           /* cancels not answered yet */
	int tries;                  /* a command created meanwhile: cancel again */
};

static void decom_remove(struct hub_req *rq);
static void decom_cancel_pending(struct hub_req *rq);

/* One pending command's cancel, on its way. */
struct decom_cancel {
	struct hub_req *rq;
	char id[CMD_ID_MAX + 1];
};

static void on_decom_canceled(redisReply *r, void *arg)
{
	struct decom_cancel *dc = arg;
	struct hub_req *rq = dc->rq;
	struct decom *d = hub_req_ctx(rq);
	const char *was = r && r->type == REDIS_REPLY_ARRAY && r->elements > 1 &&
			  r->element[0]->type == REDIS_REPLY_INTEGER && r->element[0]->integer == 1 &&
			  r->element[1]->type == REDIS_REPLY_STRING ? r->element[1]->str : NULL;

	if (was && strcmp(was, "queued"))
		cmd_route_cancel(hub_req_hub(rq), dc->id, d->device);
	if (was)
		hub_metrics_command_final(&hub_req_hub(rq)->metrics, "canceled");
	free(dc);
	if (!--d->pending && !hub_req_gone(rq))
		decom_remove(rq);
	hub_req_unref(rq);
}

static void on_decom_pending(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct decom *d = hub_req_ctx(rq);
	struct hub *hub = hub_req_hub(rq);

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type != REDIS_REPLY_ARRAY) {
		hub_req_unavailable(rq);
		goto out;
	}
	if (!r->elements) {
		decom_remove(rq);
		goto out;
	}
	d->pending = (unsigned)r->elements + 1; /* + this step's own hold */
	for (size_t i = 0; i < r->elements; i++) {
		struct decom_cancel *dc;

		if (r->element[i]->type != REDIS_REPLY_STRING ||
		    r->element[i]->len > CMD_ID_MAX) {
			d->pending--;
			continue;
		}
		dc = hub_xcalloc(1, sizeof(*dc));
		dc->rq = rq;
		memcpy(dc->id, r->element[i]->str, r->element[i]->len);
		if (cmd_cancel(hub, dc->id, on_decom_canceled, dc)) {
			free(dc);
			d->pending--;
			continue;
		}
		hub_req_ref(rq);
	}
	if (!--d->pending)
		decom_remove(rq);
out:
	hub_req_unref(rq);
}

static void decom_cancel_pending(struct hub_req *rq)
{
	struct decom *d = hub_req_ctx(rq);
	char key[HUB_KEY_MAX];
	const char *argv[4] = { "ZRANGE", key, "0", "-1" };

	hub_key_dev_cmds(key, sizeof(key), d->device);
	await_reply(rq, hub_redis_command_argv(hub_req_hub(rq)->redis, on_decom_pending, rq, 4,
					       argv, NULL));
}

static void on_decom_removed(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct decom *d = hub_req_ctx(rq);
	struct hub *hub = hub_req_hub(rq);

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type != REDIS_REPLY_INTEGER) {
		if (r && r->type == REDIS_REPLY_ERROR)
			hub_err("decommission %s: %s", d->device, r->str);
		hub_req_unavailable(rq);
		goto out;
	}
	if (r->integer == 0) {
		hub_req_error(rq, 404, "not_found", NULL, "no such device");
		goto out;
	}
	if (r->integer < 0) {          /* a command or a type change came between */
		if (++d->tries > 3) {
			hub_req_error(rq, 409, "conflict", NULL,
				      "the device keeps getting new commands; try again");
			goto out;
		}
		decom_cancel_pending(rq);
		goto out;
	}
	{
		char msg[HUB_ID_MAX + 4], key[HUB_KEY_MAX];
		int n = snprintf(msg, sizeof(msg), "%s -\n", d->device);

		/* "-" is no connection: whoever holds the device drops it. */
		hub_redis_publish(hub->redis, HUB_CH_DEVTAKE, msg, (size_t)n);
		if (d->purge) {
			unsigned shards = hub_ingest_shards(hub);
			for (unsigned k = 0; k < (shards ? shards : 1); k++) {
				const char *argv[2] = { "DEL", key };
				if (hub_key_tm_shard(key, sizeof(key), k, d->device))
					hub_redis_command_argv(hub->redis, NULL, NULL, 2, argv, NULL);
			}
		}
		hub_audit(hub, rq, "device.delete", d->device,
			  d->purge ? "{\"purge\":true}" : "{\"purge\":false}");
		hub_req_respond(rq, 204, "application/json", "", 0);
	}
out:
	hub_req_unref(rq);
}

static void decom_remove(struct hub_req *rq)
{
	struct decom *d = hub_req_ctx(rq);
	struct hub *hub = hub_req_hub(rq);
	const struct cmd_api *ca = d->ca;
	unsigned slot = hub_dev_slot(d->device);
	char k[6][HUB_KEY_MAX];
	const char *argv[12];

	hub_key_dev(k[0], sizeof(k[0]), d->device);
	hub_key_idx_devices(k[1], sizeof(k[1]), slot);
	if (!hub_key_idx_type(k[2], sizeof(k[2]), slot, d->type))
		hub_key_idx_devices(k[2], sizeof(k[2]), slot); /* no type: a key of the slot */
	hub_key_dev_cmds(k[3], sizeof(k[3]), d->device);
	hub_key_dev_cancels(k[4], sizeof(k[4]), d->device);
	hub_key_dev_cmdlog(k[5], sizeof(k[5]), d->device);
	argv[0] = "EVALSHA";
	argv[1] = hub_redis_script_sha(hub->redis, ca->script_decommission);
	argv[2] = "6";
	for (int i = 0; i < 6; i++)
		argv[3 + i] = k[i];
	argv[9] = d->device;
	argv[10] = d->type;
	argv[11] = d->purge ? "1" : "0";
	await_reply(rq, hub_redis_command_argv(hub->redis, on_decom_removed, rq, 12, argv, NULL));
}

static void on_decom_type(redisReply *r, void *arg)
{
	struct hub_req *rq = arg;
	struct decom *d = hub_req_ctx(rq);

	if (hub_req_gone(rq))
		goto out;
	if (!r || r->type == REDIS_REPLY_ERROR) {
		hub_req_unavailable(rq);
		goto out;
	}
	if (r->type != REDIS_REPLY_STRING) {
		hub_req_error(rq, 404, "not_found", NULL, "no such device");
		goto out;
	}
	snprintf(d->type, sizeof(d->type), "%s", r->str);
	decom_cancel_pending(rq);
out:
	hub_req_unref(rq);
}

static void on_device_delete(struct hub_req *rq, const struct hub_route_args *a)
{
	const char *dev = a->param[0], *purge = NULL;
	struct decom *d;
	char key[HUB_KEY_MAX];
	const char *argv[3] = { "HGET", key, "type" };

	for (size_t i = 0; a->query && i < a->query->n; i++)
		if (!strcmp(a->query->name[i], "purge"))
			purge = a->query->value[i];
	if (purge && strcmp(purge, "true") && strcmp(purge, "false")) {
		hub_req_error(rq, 422, "invalid", "purge", "purge must be true or false");
		return;
	}
	if (!hub_id_valid(dev, strlen(dev)) || !visible(rq, dev) ||
	    !hub_key_dev(key, sizeof(key), dev)) {
		hub_req_error(rq, 404, "not_found", NULL, "no such device");
		return;
	}
	d = hub_xcalloc(1, sizeof(*d));
	d->ca = a->ctx;
	snprintf(d->device, sizeof(d->device), "%s", dev);
	d->purge = purge && !strcmp(purge, "true");
	hub_req_set_ctx(rq, d, free);
	await_reply(rq, hub_redis_command_argv(hub_req_hub(rq)->redis, on_decom_type, rq, 3, argv,
					       NULL));
}

/* GET /v1/commands/stats: transitions per state over a window. */
static void on_stats(struct hub_req *rq, const struct hub_route_args *a)
{
	const struct cmd_api *ca = a->ctx;

	cmd_stats_answer(ca->stats, rq, a->query);
}

static const struct hub_route routes[] = {
	{ "POST", "/v1/devices/{}/commands", HUB_ROUTE_KEY, WRITE, on_device_create },
	{ "GET", "/v1/devices/{}/commands", HUB_ROUTE_KEY, READ, on_device_list },
	{ "POST", "/v1/commands", HUB_ROUTE_KEY, WRITE, on_fleet_create },
	{ "GET", "/v1/commands/stats", HUB_ROUTE_KEY, READ, on_stats },
	{ "GET", "/v1/commands/{}", HUB_ROUTE_KEY, READ, on_get_one },
	{ "POST", "/v1/commands/{}/cancel", HUB_ROUTE_KEY, WRITE, on_cancel },
	{ "POST", "/v1/commands/{}/pause", HUB_ROUTE_KEY, WRITE, on_pause },
	{ "POST", "/v1/commands/{}/resume", HUB_ROUTE_KEY, WRITE, on_resume },
	{ "DELETE", "/v1/devices/{}", HUB_ROUTE_KEY, AUTH_SCOPE_ADMIN, on_device_delete },
};

static int cmd_api_start(struct hub *hub, char *err, size_t errlen)
{
	struct cmd_api *ca = hub_xcalloc(1, sizeof(*ca));

	(void)err;
	(void)errlen;
	ca->script_decommission = hub_redis_add_script(hub->redis, hub_lua_decommission);
	ca->stats = cmd_stats_new(hub);
	hub->cmd_api = ca;
	hub_http_add_routes(hub, routes, sizeof(routes) / sizeof(routes[0]), ca);
	return 0;
}

static void cmd_api_stop(struct hub *hub)
{
	if (hub->cmd_api)
		cmd_stats_stop(hub->cmd_api->stats);
}

static void cmd_api_free(struct hub *hub)
{
	if (hub->cmd_api)
		cmd_stats_free(hub->cmd_api->stats);
	free(hub->cmd_api);
	hub->cmd_api = NULL;
}

const struct hub_module cmd_api_module = {
	.name = "commands-api",
	.start = cmd_api_start,
	.stop = cmd_api_stop,
	.free = cmd_api_free,
};
