#include "protocols/gw_codec.h"

#include <string.h>

#include "protocols/jparse.h"
#include "protocols/schema.h"

static bool json_int64(const json_t *v, int64_t *out)
{
	if (!json_is_integer(v))
		return false;
	*out = (int64_t)json_integer_value(v);
	return true;
}

/* msg->items = root[field], which must be an array of at most max entries. */
static enum gw_parse_result take_items(gw_msg *msg, const char *field, size_t max,
				       const char *limit_name, char *err, size_t errlen)
{
	msg->items = json_object_get(msg->root, field);
	if (!json_is_array(msg->items)) {
		snprintf(err, errlen, "\"%s\" must be an array", field);
		return GW_BAD_MESSAGE;
	}
	if (json_array_size(msg->items) > max) {
		snprintf(err, errlen, "too many %s: %zu > %s %zu", field,
			 json_array_size(msg->items), limit_name, max);
		return GW_BAD_MESSAGE;
	}
	return GW_OK;
}

enum gw_parse_result gw_msg_parse(const char *buf, size_t len, size_t max_readings,
				  size_t max_devices, gw_msg *msg, char *err, size_t errlen)
{
	json_error_t jerr;
	json_t *root, *t;
	const char *type;

	memset(msg, 0, sizeof(*msg));
	root = jparse(buf, len, &jerr); /* json_loadb with JSON_REJECT_DUPLICATES, faster */
	if (!root) {
		snprintf(err, errlen, "invalid JSON at byte %d: %s", jerr.position, jerr.text);
		return GW_BAD_JSON;
	}
	if (!json_is_object(root)) {
		json_decref(root);
		snprintf(err, errlen, "a message must be a JSON object");
		return GW_BAD_JSON;
	}
	msg->root = root;
	msg->text = buf;
	msg->text_len = len;
	t = json_object_get(root, "type");
	type = json_string_value(t);
	if (!type) {
		snprintf(err, errlen, "missing string field \"type\"");
		return GW_BAD_MESSAGE;
	}
	if (!strcmp(type, "telemetry")) {
		json_t *seq = json_object_get(root, "seq");
		msg->type = GW_MSG_TELEMETRY;
		if (json_int64(seq, &msg->seq) && msg->seq >= 0)
			msg->has_seq = true;
		if (!msg->has_seq) {
			snprintf(err, errlen, "\"seq\" must be a non-negative integer");
			return GW_BAD_MESSAGE;
		}
		return take_items(msg, "readings", max_readings,
				  "max-readings-per-frame", err, errlen);
	}
	if (!strcmp(type, "announce")) {
		msg->type = GW_MSG_ANNOUNCE;
		return take_items(msg, "devices", max_devices,
				  "max-devices-per-gateway", err, errlen);
	}
	if (!strcmp(type, "command_ack")) {
		msg->type = GW_MSG_COMMAND_ACK;
		return GW_OK;
	}
	snprintf(err, errlen, "unknown message type \"%.64s\"", type);
	return GW_BAD_MESSAGE;
}

void gw_msg_clear(gw_msg *msg)
{
	if (msg && msg->root) {
		json_decref(msg->root);
		msg->root = NULL;
		msg->items = NULL;
	}
}

/* ---- raw spans of a parsed frame ------------------------------------------
 * The text is known to be valid JSON (jansson parsed it), so the scanner only
 * has to find token boundaries: strings end at an unescaped quote, containers
 * at the matching bracket, scalars at a delimiter. */

struct scan {
	const char *p, *end;
};

static void skip_ws(struct scan *s)
{
	while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
		s->p++;
}

/* s->p at the opening quote; leaves it after the closing one. *escaped tells
 * whether the string had a backslash (its raw bytes are not its value). */
static void skip_string(struct scan *s, bool *escaped)
{
	s->p++;
	while (s->p < s->end && *s->p != '"') {
		if (*s->p == '\\') {
			*escaped = true;
			s->p++;
		}
		s->p++;
	}
	s->p++;
}

static void skip_value(struct scan *s)
{
	bool esc = false;
	int depth = 0;

	skip_ws(s);
	if (s->p >= s->end)
		return;
	if (*s->p == '"') {
		skip_string(s, &esc);
		return;
	}
	if (*s->p != '{' && *s->p != '[') {
		while (s->p < s->end && !strchr(",}] \t\n\r", *s->p))
			s->p++;
		return;
	}
	do {
		if (*s->p == '"') {
			skip_string(s, &esc);
			continue;
		}
		if (*s->p == '{' || *s->p == '[')
			depth++;
		else if (*s->p == '}' || *s->p == ']')
			depth--;
		s->p++;
	} while (depth && s->p < s->end);
}

/* At an object member (or its closing brace): reads the key. Returns 1 with
 * key/klen set, 0 at the end of the object, -1 for an escaped key. */
static int next_key(struct scan *s, const char **key, size_t *klen)
{
	bool esc = false;

	skip_ws(s);
	if (s->p < s->end && *s->p == ',')
		s->p++;
	skip_ws(s);
	if (s->p >= s->end || *s->p != '"')
		return 0;
	*key = s->p + 1;
	skip_string(s, &esc);
	*klen = (size_t)(s->p - 1 - *key);
	skip_ws(s);
	s->p++; /* ':' */
	skip_ws(s);
	return esc ? -1 : 1;
}

static bool key_is(const char *k, size_t kl, const char *name)
{
	return kl == strlen(name) && !memcmp(k, name, kl);
}

int gw_data_spans(const gw_msg *msg, gw_span *spans, size_t n)
{
	struct scan s = { msg->text, msg->text + msg->text_len };
	const char *k;
	size_t kl, i = 0;
	int r;

	skip_ws(&s);
	if (!msg->text || s.p >= s.end || *s.p != '{')
		return -1;
	s.p++;
	while ((r = next_key(&s, &k, &kl)) == 1 && !key_is(k, kl, "readings"))
		skip_value(&s);
	if (r != 1 || *s.p != '[')
		return -1;
	s.p++;
	for (;;) {
		skip_ws(&s);
		if (s.p < s.end && *s.p == ',')
			s.p++;
		skip_ws(&s);
		if (s.p >= s.end || *s.p == ']')
			break;
		if (i == n)
			return -1;
		spans[i].off = spans[i].len = 0;
		if (*s.p != '{') {
			skip_value(&s);
			i++;
			continue;
		}
		s.p++;
		while ((r = next_key(&s, &k, &kl)) == 1) {
			const char *v = s.p;
			skip_value(&s);
			if (key_is(k, kl, "data")) {
				spans[i].off = (size_t)(v - msg->text);
				spans[i].len = (size_t)(s.p - v);
			}
		}
		if (r < 0)
			return -1;
		s.p++; /* '}' */
		i++;
	}
	return i == n ? 0 : -1;
}

void gw_append_compact(hub_buf *b, const char *json, size_t len)
{
	char *o;
	bool in_str = false;

	hub_buf_reserve(b, len + 1);
	o = b->data + b->len;
	for (size_t i = 0; i < len; i++) {
		char ch = json[i];
		if (in_str) {
			*o++ = ch;
			if (ch == '\\' && i + 1 < len)
				*o++ = json[++i];
			else if (ch == '"')
				in_str = false;
		} else if (ch == '"') {
			in_str = true;
			*o++ = ch;
		} else if (ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r') {
			*o++ = ch;
		}
	}
	b->len = (size_t)(o - b->data);
}

static void set_err(struct schema_error *err, const char *path, const char *code,
		    const char *message)
{
	snprintf(err->path, sizeof(err->path), "%s", path);
	err->code = code;
	snprintf(err->message, sizeof(err->message), "%s", message);
}

int gw_reading_parse(json_t *r, gw_reading *out, struct schema_error *err)
{
	json_t *d, *ts;

	memset(out, 0, sizeof(*out));
	if (!json_is_object(r)) {
		set_err(err, "", "type", "a reading must be an object");
		return -1;
	}
	d = json_object_get(r, "device");
	if (!json_is_string(d)) {
		set_err(err, "device", d ? "type" : "required",
			d ? "must be a string" : "is required");
		return -1;
	}
	out->device = json_string_value(d);
	out->device_len = json_string_length(d);
	if (!hub_id_valid(out->device, out->device_len)) {
		set_err(err, "device", "pattern", "must match [A-Za-z0-9._:-]{1,128}");
		return -1;
	}
	ts = json_object_get(r, "ts");
	if (ts && !json_is_null(ts)) {
		if (!json_int64(ts, &out->ts) || out->ts < 0) {
			set_err(err, "ts", "type", "must be a non-negative integer (ms since the epoch)");
			return -1;
		}
		out->has_ts = true;
	}
	out->data = json_object_get(r, "data");
	if (!json_is_object(out->data)) {
		set_err(err, "data", out->data ? "type" : "required",
			out->data ? "must be an object" : "is required");
		return -1;
	}
	return 0;
}

int gw_announce_parse(json_t *e, gw_announce *out, char *err, size_t errlen)
{
	json_t *d, *t, *l;
	const char *k;
	json_t *v;

	memset(out, 0, sizeof(*out));
	if (!json_is_object(e)) {
		snprintf(err, errlen, "an announced device must be an object");
		return -1;
	}
	d = json_object_get(e, "device");
	if (json_is_string(d)) {
		out->device = json_string_value(d);
		out->device_len = json_string_length(d);
	}
	if (!out->device) {
		snprintf(err, errlen, "\"device\" must be a string");
		return -1;
	}
	if (!hub_id_valid(out->device, out->device_len)) {
		snprintf(err, errlen, "\"device\" must match [A-Za-z0-9._:-]{1,128}");
		return -1;
	}
	t = json_object_get(e, "device_type");
	if (!json_is_string(t)) {
		snprintf(err, errlen, "\"device_type\" must be a string");
		return -1;
	}
	out->device_type = json_string_value(t);
	out->type_len = json_string_length(t);
	l = json_object_get(e, "labels");
	if (l && !json_is_null(l)) {
		if (!json_is_object(l) || json_object_size(l) > 64) {
			snprintf(err, errlen,
				 "\"labels\" must be an object of at most 64 strings");
			return -1;
		}
		json_object_foreach(l, k, v) {
			if (!json_is_string(v) || strlen(k) > 128 || json_string_length(v) > 256) {
				snprintf(err, errlen, "label values must be strings "
					 "(keys <= 128, values <= 256 bytes)");
				return -1;
			}
		}
		out->labels = l;
	}
	return 0;
}

int gw_command_ack_parse(const gw_msg *msg, gw_command_ack *out, char *err, size_t errlen)
{
	json_t *root = msg->root;

	memset(out, 0, sizeof(*out));
	out->id = json_string_value(json_object_get(root, "id"));
	out->status = json_string_value(json_object_get(root, "status"));
	if (!out->id || !out->status) {
		snprintf(err, errlen, "command_ack needs string \"id\" and \"status\"");
		return -1;
	}
	out->progress = json_object_get(root, "progress");
	if (out->progress && !json_is_number(out->progress)) {
		snprintf(err, errlen, "\"progress\" must be a number");
		return -1;
	}
	out->message = json_string_value(json_object_get(root, "message"));
	out->error = json_string_value(json_object_get(root, "error"));
	out->result = json_object_get(root, "result");
	return 0;
}

bool gw_ack_status_valid(const char *s)
{
	return !strcmp(s, "received") || !strcmp(s, "in_progress") || !strcmp(s, "succeeded") ||
	       !strcmp(s, "failed") || !strcmp(s, "rejected");
}

int gw_command_ack_check(const gw_command_ack *a, size_t max_result, char *err,
			 size_t errlen)
{
	if (strlen(a->id) > GW_ACK_ID_MAX) {
		snprintf(err, errlen, "\"id\" is longer than any command id");
		return -1;
	}
	if ((a->message && strlen(a->message) > GW_ACK_TEXT_MAX) ||
	    (a->error && strlen(a->error) > GW_ACK_TEXT_MAX)) {
		snprintf(err, errlen, "\"message\" and \"error\" are limited to 1024 bytes");
		return -1;
	}
	if (a->result && json_dumpb(a->result, NULL, 0, JSON_COMPACT | JSON_ENCODE_ANY) > max_result) {
		snprintf(err, errlen, "\"result\" is larger than max-command-result-bytes");
		return -1;
	}
	return 0;
}

void gw_write_reading_reject(hub_buf *b, size_t index, const gw_reading *rd, const char *code)
{
	if (b->len)
		hub_buf_puts(b, ",");
	hub_buf_printf(b, "{\"index\":%zu,", index);
	if (rd->device) {
		hub_buf_puts(b, "\"device\":");
		hub_buf_json_str(b, rd->device, rd->device_len);
		hub_buf_puts(b, ",");
	}
	hub_buf_printf(b, "\"code\":\"%s\"", code);
}

void gw_write_announce_reject(hub_buf *b, const gw_announce *a, const char *code,
			      const char *message)
{
	if (b->len)
		hub_buf_puts(b, ",");
	hub_buf_puts(b, "{\"device\":");
	if (a->device)
		hub_buf_json_str(b, a->device, a->device_len);
	else
		hub_buf_puts(b, "null");
	hub_buf_puts(b, ",\"code\":");
	hub_buf_json_str(b, code, strlen(code));
	hub_buf_puts(b, ",\"message\":");
	hub_buf_json_str(b, message, strlen(message));
	hub_buf_puts(b, "}");
}

void gw_write_field_errors(hub_buf *b, const schema_error *errs, int n, int total)
{
	hub_buf_puts(b, ",\"errors\":[");
	for (int i = 0; i < n; i++) {
		hub_buf_puts(b, i ? ",{\"path\":" : "{\"path\":");
		hub_buf_json_str(b, errs[i].path, strlen(errs[i].path));
		hub_buf_puts(b, ",\"code\":");
		hub_buf_json_str(b, errs[i].code, strlen(errs[i].code));
		hub_buf_puts(b, ",\"message\":");
		hub_buf_json_str(b, errs[i].message, strlen(errs[i].message));
		hub_buf_puts(b, "}");
	}
	hub_buf_puts(b, "]");
	if (total > n)
		hub_buf_printf(b, ",\"more_errors\":%d", total - n);
}

void gw_write_error(hub_buf *b, const char *code, int64_t seq,
		    int64_t retry_after_ms, const char *message)
{
	hub_buf_puts(b, "{\"type\":\"error\",\"code\":");
	hub_buf_json_str(b, code, strlen(code));
	if (seq >= 0)
		hub_buf_printf(b, ",\"seq\":%lld", (long long)seq);
	if (retry_after_ms >= 0)
		hub_buf_printf(b, ",\"retry_after_ms\":%lld", (long long)retry_after_ms);
	hub_buf_puts(b, ",\"message\":");
	hub_buf_json_str(b, message, strlen(message));
	hub_buf_puts(b, "}");
}
