/* libFuzzer harness: libiothub-gw's parser of the hub's messages
 * (sdk/c/src/msg.c). Every input is parsed as a message from the hub; what
 * parses is walked as the gateway would (rejects' index/code, command fields). */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "sdk/c/src/internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char err[128];
	struct gwm m;
	size_t i;
	json_t *e;
	volatile size_t sink = 0;

	if (gwm_parse(&m, (const char *)data, size, err, sizeof(err))) {
		if (!memchr(err, 0, sizeof(err)))
			__builtin_trap();
		return 0;
	}
	json_array_foreach(m.rejected, i, e) {
		json_t *ix = json_object_get(e, "index"), *code = json_object_get(e, "code");

		sink += json_is_integer(ix) ? (size_t)json_integer_value(ix) : 0;
		sink += json_is_string(code) ? strlen(json_string_value(code)) : 0;
	}
	if (m.type == GWM_COMMAND)
		sink += strlen(m.id) + strlen(m.device) + strlen(m.name);
	if (m.type == GWM_ERROR)
		sink += strlen(m.code);
	(void)sink;
	gwm_free(&m);
	return 0;
}
