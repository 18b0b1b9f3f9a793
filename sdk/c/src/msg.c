/*
 * msg.c - the parser of the hub's messages to a gateway (docs/protocol.md,
 * "Messages"): ack, announced, error, command, cancel. Unknown types and
 * unknown members are ignored, as the protocol asks; a known type with a
 * member of the wrong type is an error the caller drops. No lws here: the
 * fuzz harness (tests/fuzz/fuzz_sdk_msg.c) links this file alone.
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

#define MSG_MAX_BYTES (1u << 20)

static int fail(struct gwm *m, char *err, size_t errlen, const char *what)
{
	if (err && errlen)
		snprintf(err, errlen, "%s", what);
	json_decref(m->root);
	memset(m, 0, sizeof(*m));
	return -1;
}

/* member k of o: absent/null -> 0; a string -> 1 (*out); else -1 */
static int opt_str(json_t *o, const char *k, const char **out)
{
	json_t *v = json_object_get(o, k);

	if (!v || json_is_null(v))
		return 0;
	if (!json_is_string(v))
		return -1;
	*out = json_string_value(v);
	return 1;
}

static int opt_int(json_t *o, const char *k, int64_t *out)
{
	json_t *v = json_object_get(o, k);

	if (!v || json_is_null(v))
		return 0;
	if (!json_is_integer(v))
		return -1;
	*out = (int64_t)json_integer_value(v);
	return 1;
}

int gwm_parse(struct gwm *m, const char *buf, size_t len, char *err, size_t errlen)
{
	json_error_t je;
	const char *type = NULL;
	int64_t v;

	memset(m, 0, sizeof(*m));
	m->retry_after_ms = -1;
	if (len > MSG_MAX_BYTES)
		return fail(m, err, errlen, "message too large");
	m->root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &je);
	if (!m->root)
		return fail(m, err, errlen, "not JSON");
	if (!json_is_object(m->root))
		return fail(m, err, errlen, "not a JSON object");
	if (opt_str(m->root, "type", &type) != 1)
		return fail(m, err, errlen, "no string type");
	switch (opt_int(m->root, "retry_after_ms", &v)) {
	case -1:
		return fail(m, err, errlen, "retry_after_ms not an integer");
	case 1:
		m->retry_after_ms = v < 0 ? 0 : v;
		break;
	}
	if (opt_str(m->root, "message", &m->message) < 0)
		m->message = NULL;   /* words only: never a reason to drop */
	v = -1;
	switch (opt_int(m->root, "seq", &v)) {
	case -1:
		if (!strcmp(type, "ack"))
			return fail(m, err, errlen, "seq not an integer");
		break;
	case 1:
		if (v < 0)
			return fail(m, err, errlen, "negative seq");
		m->has_seq = 1;
		m->seq = (uint64_t)v;
		break;
	}
	if (opt_str(m->root, "id", &m->id) < 0 || opt_str(m->root, "device", &m->device) < 0)
		return fail(m, err, errlen, "id or device not a string");

	if (!strcmp(type, "ack")) {
		json_t *d = json_object_get(m->root, "duplicate");

		m->type = GWM_ACK;
		if (!m->has_seq)
			return fail(m, err, errlen, "ack without seq");
		if (opt_int(m->root, "accepted", &m->accepted) < 0)
			return fail(m, err, errlen, "accepted not an integer");
		m->duplicate = json_is_true(d);
		m->rejected = json_object_get(m->root, "rejected");
		if (m->rejected && !json_is_array(m->rejected))
			return fail(m, err, errlen, "rejected not an array");
	} else if (!strcmp(type, "announced")) {
		m->type = GWM_ANNOUNCED;
		m->rejected = json_object_get(m->root, "rejected");
		if (m->rejected && !json_is_array(m->rejected))
			return fail(m, err, errlen, "rejected not an array");
	} else if (!strcmp(type, "error")) {
		m->type = GWM_ERROR;
		if (opt_str(m->root, "code", &m->code) != 1)
			return fail(m, err, errlen, "error without a string code");
	} else if (!strcmp(type, "command")) {
		int64_t a = 1, e = 0;

		m->type = GWM_COMMAND;
		if (opt_str(m->root, "name", &m->name) != 1 || !m->id || !m->device)
			return fail(m, err, errlen, "command without id, device or name");
		if (opt_int(m->root, "attempt", &a) < 0 || opt_int(m->root, "expires_at", &e) < 0)
			return fail(m, err, errlen, "attempt or expires_at not an integer");
		if (strlen(m->id) > 64)
			return fail(m, err, errlen, "command id over 64 bytes");
		m->attempt = a < 0 ? 0 : a > 1000000 ? 1000000 : (int)a;
		m->expires_at = e;
		m->params = json_object_get(m->root, "params");
	} else if (!strcmp(type, "cancel")) {
		m->type = GWM_CANCEL;
		if (!m->id)
			return fail(m, err, errlen, "cancel without id");
	} else {
		m->type = GWM_OTHER;
	}
	return 0;
}

void gwm_free(struct gwm *m)
{
	json_decref(m->root);
	memset(m, 0, sizeof(*m));
}
