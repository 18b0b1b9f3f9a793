/*
 * gw_codec.h - the gateway wire protocol (docs/protocol.md) as bytes in, structs
 * out, and the hub's replies as bytes. No libwebsockets here: parsed and
 * fuzzed alone. Every limit is checked before anything is allocated for it.
 */
#ifndef HUB_GW_CODEC_H
#define HUB_GW_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

#include "hub/util.h"
#include "protocols/schema.h"

enum gw_msg_type {
	GW_MSG_ANNOUNCE = 1,
	GW_MSG_TELEMETRY,
	GW_MSG_COMMAND_ACK,
};

/* What a frame is (docs/hacking.md "Errors": a result the caller switches
 * on, 0 = a message to handle). */
enum gw_parse_result {
	GW_OK = 0,
	GW_BAD_JSON,             /* not JSON, or not an object: `bad_json` */
	GW_BAD_MESSAGE,          /* JSON, but not a valid message: `bad_message` */
};

typedef struct gw_msg {
	enum gw_msg_type type;
	json_t *root;      /* owned: gw_msg_clear() releases it */
	json_t *items;     /* borrowed from root: readings or devices array */
	int64_t seq;       /* telemetry */
	bool has_seq;      /* a valid seq was present (even if the msg is bad) */
	const char *text;  /* the frame parsed (borrowed: valid while it is) */
	size_t text_len;
} gw_msg;

/* Parses one text frame. On GW_OK fills *msg (caller gw_msg_clear()s it).
 * Otherwise writes the reason, the message of the error frame, to err (160
 * bytes hold all but the longest of jansson's parse errors, which are cut);
 * msg->has_seq/seq still tell the seq of a bad telemetry frame so the error
 * can name it, and msg must still be cleared. max_readings caps readings per
 * telemetry frame, max_devices devices per announce. */
enum gw_parse_result gw_msg_parse(const char *buf, size_t len, size_t max_readings,
				  size_t max_devices, gw_msg *msg, char *err, size_t errlen);

/* Releases msg->root. NULL-safe, idempotent. */
void gw_msg_clear(gw_msg *msg);

/* Where each reading's `data` value is in the text of a parsed telemetry
 * frame: spans[i] = {offset, length} for readings[i], {0, 0} when it has
 * none. Lets the hub store `data` as the gateway wrote it (numbers keep their
 * digits) instead of serializing the parsed object again. Returns 0, or -1
 * when the text cannot be mapped with certainty (an escaped key where
 * "readings" or "data" could be, or a count that differs from n): then the
 * caller serializes. Relies on msg->text being valid JSON (gw_msg_parse). */
typedef struct gw_span {
	size_t off, len;
} gw_span;
int gw_data_spans(const gw_msg *msg, gw_span *spans, size_t n);

/* Appends json (valid JSON text) to b without the whitespace between tokens:
 * the compact form, byte for byte otherwise. */
void gw_append_compact(hub_buf *b, const char *json, size_t len);

typedef struct gw_reading {
	const char *device;   /* borrowed; NUL-terminated */
	size_t device_len;
	int64_t ts;
	bool has_ts;
	json_t *data;         /* borrowed object */
} gw_reading;

/* Structural check of readings[i]. Returns 0, or -1 with err filled (path,
 * code, message) for a reading that is malformed (then it is `invalid`). */
struct schema_error;
int gw_reading_parse(json_t *r, gw_reading *out, struct schema_error *err);

typedef struct gw_announce {
	const char *device;   /* borrowed; NULL when missing/not a string */
	size_t device_len;
	const char *device_type;
	size_t type_len;
	json_t *labels;       /* borrowed object or NULL */
} gw_announce;

/* Structural check of devices[i]. Returns 0, or -1 with the reason in err
 * (then the entry is rejected `invalid` with it as its message; 128 bytes
 * hold every reason). out->device is set whenever the entry had a string
 * device, so the rejection can name it. */
int gw_announce_parse(json_t *e, gw_announce *out, char *err, size_t errlen);

/* A command_ack's fields (borrowed from the message). */
typedef struct gw_command_ack {
	const char *id;
	const char *status;
	json_t *progress;   /* may be NULL */
	const char *message;
	const char *error;
	json_t *result;
} gw_command_ack;

/* Fills out from a parsed command_ack. Returns 0, or -1 with the reason in
 * err (128 bytes hold every reason) when id or status is not a string or
 * progress not a number. */
int gw_command_ack_parse(const gw_msg *msg, gw_command_ack *out, char *err, size_t errlen);

/* The statuses a gateway may report: received, in_progress, succeeded,
 * failed, rejected. */
bool gw_ack_status_valid(const char *s);

/* Checks a parsed ack against the sizes the hub keeps: the id at most
 * GW_ACK_ID_MAX bytes, `message` and `error` at most GW_ACK_TEXT_MAX,
 * `result` at most max_result bytes as compact JSON. Returns 0, or -1 with
 * the reason in err (the ack is refused, nothing of it is stored; 128 bytes
 * hold every reason). */
#define GW_ACK_ID_MAX   64
#define GW_ACK_TEXT_MAX 1024
int gw_command_ack_check(const gw_command_ack *a, size_t max_result, char *err,
			 size_t errlen);

/* Appends (after a comma when b is not empty) the opening of a rejected
 * reading's entry: {"index":i[,"device":…],"code":"code" — the caller adds
 * what the code needs and the closing brace. */
void gw_write_reading_reject(hub_buf *b, size_t index, const gw_reading *rd, const char *code);

/* Appends (after a comma when b is not empty) a rejected announce entry:
 * {"device":…|null,"code":…,"message":…}. */
void gw_write_announce_reject(hub_buf *b, const gw_announce *a, const char *code,
			      const char *message);

/* Appends `,"errors":[{"path","code","message"},...]` for errs[0..n) and,
 * when total > n, `,"more_errors":total-n` (a rejected reading's fields). */
void gw_write_field_errors(hub_buf *b, const schema_error *errs, int n, int total);

/* Appends {"type":"error","code":code[,"seq":seq][,"retry_after_ms":n],
 * "message":message} to b. seq < 0 and retry_after_ms < 0 are omitted. */
void gw_write_error(hub_buf *b, const char *code, int64_t seq,
		    int64_t retry_after_ms, const char *message);

#endif
