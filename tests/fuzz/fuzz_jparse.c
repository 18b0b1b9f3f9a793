/* libFuzzer harness: jparse against jansson. For every input, jparse and
 * json_loadb(JSON_REJECT_DUPLICATES) must agree on accept/reject and build
 * the same tree: same types (an integer never a real), same keys in the same
 * order, same string bytes, reals bit for bit (json_equal compares them with
 * ==, which takes -0.0 for 0.0). Any difference traps. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "protocols/jparse.h"
#include "tests/jparse_same.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	json_error_t e;
	json_t *want = json_loadb((const char *)data, size,
				  JSON_REJECT_DUPLICATES, NULL);
	json_t *got = jparse((const char *)data, size, &e);

	if (!want != !got)
		__builtin_trap();
	if (got && (!json_equal(want, got) || !same(want, got)))
		__builtin_trap();
	/* An error says where and why, inside the input. */
	if (!got && (!e.text[0] || e.position < 0 || (size_t)e.position > size ||
		     e.line < 1 || e.column < 1))
		__builtin_trap();
	json_decref(want);
	json_decref(got);
	return 0;
}
