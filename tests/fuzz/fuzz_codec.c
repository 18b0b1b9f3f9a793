/* libFuzzer harness: the gateway wire codec. Every input is parsed as a
 * gateway message; each reading / announce entry / command_ack is taken
 * apart as the gateway protocol would, and the error writer gets the reason. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "protocols/gw_codec.h"
#include "protocols/schema.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char why[160];
	gw_msg msg;
	hub_buf out = { 0 };
	enum gw_parse_result rc = gw_msg_parse((const char *)data, size, 1000, 1000, &msg, why,
					       sizeof(why));

	if (rc == GW_OK && msg.type == GW_MSG_TELEMETRY) {
		size_t n = json_array_size(msg.items);
		gw_span *spans = n ? malloc(n * sizeof(*spans)) : NULL;
		/* A mapped data span, compacted, is the parsed data exactly. */
		if (n && !gw_data_spans(&msg, spans, n)) {
			for (size_t i = 0; i < n; i++) {
				json_t *d = json_object_get(json_array_get(msg.items, i), "data");
				if (!spans[i].len) {
					if (d)
						__builtin_trap();
					continue;
				}
				out.len = 0;
				gw_append_compact(&out, msg.text + spans[i].off, spans[i].len);
				json_t *back = json_loadb(out.data, out.len, JSON_DECODE_ANY, NULL);
				if (!back || !json_equal(back, d))
					__builtin_trap();
				json_decref(back);
			}
			out.len = 0;
		}
		free(spans);
		for (size_t i = 0; i < n; i++) {
			schema_error e;
			gw_reading r;
			if (gw_reading_parse(json_array_get(msg.items, i), &r, &e))
				gw_write_error(&out, e.code, -1, -1, e.message);
			else if (strlen(r.device) != r.device_len)
				__builtin_trap(); /* ids never hide a NUL */
		}
	} else if (rc == GW_OK && msg.type == GW_MSG_ANNOUNCE) {
		for (size_t i = 0; i < json_array_size(msg.items); i++) {
			gw_announce a;
			char w[128];
			if (gw_announce_parse(json_array_get(msg.items, i), &a, w, sizeof(w)))
				gw_write_error(&out, "invalid", -1, -1, w);
		}
	} else if (rc == GW_OK && msg.type == GW_MSG_COMMAND_ACK) {
		gw_command_ack a;
		char w[128];
		if (gw_command_ack_parse(&msg, &a, w, sizeof(w)))
			gw_write_error(&out, "bad_message", -1, -1, w);
	} else if (rc != GW_OK) {
		gw_write_error(&out, "bad_json", msg.has_seq ? msg.seq : -1, -1, why);
		/* What the hub sends back must itself be valid JSON. */
		json_t *j = json_loadb(out.data, out.len, 0, NULL);
		if (!j)
			__builtin_trap();
		json_decref(j);
	}
	gw_msg_clear(&msg);
	hub_buf_free(&out);
	return 0;
}
