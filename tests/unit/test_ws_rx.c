/* Unit tests of the WebSocket message assembler (protocols/ws_rx.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "protocols/ws_rx.h"

static enum ws_rx_result feed(struct ws_rx *rx, const char *in, bool first, bool final,
			      bool binary, size_t remaining, const char **msg, size_t *len,
			      int *code)
{
	struct ws_piece p = { in, strlen(in), first, final, binary, remaining };
	const char *reason;

	return ws_rx_feed(rx, &p, 10, 25, msg, len, code, &reason);
}

static void test_whole_and_fragmented(void **state)
{
	struct ws_rx rx = { 0 };
	const char *m;
	size_t n;
	int code;

	(void)state;
	/* One piece: handed over in place. */
	assert_int_equal(feed(&rx, "hello", true, true, false, 0, &m, &n, &code), WS_RX_MESSAGE);
	assert_int_equal(n, 5);
	assert_memory_equal(m, "hello", 5);
	ws_rx_done(&rx, 1024);
	/* Three fragments, the cap (10) met exactly. */
	assert_int_equal(feed(&rx, "abc", true, false, false, 0, &m, &n, &code), WS_RX_MORE);
	assert_int_equal(feed(&rx, "def", false, false, false, 0, &m, &n, &code), WS_RX_MORE);
	assert_int_equal(feed(&rx, "ghij", false, true, false, 0, &m, &n, &code), WS_RX_MESSAGE);
	assert_int_equal(n, 10);
	assert_memory_equal(m, "abcdefghij", 10);
	ws_rx_done(&rx, 1024);
	assert_int_equal(rx.buf.len, 0);
	ws_rx_free(&rx);
}

static void test_too_large_is_dropped_then_closed(void **state)
{
	struct ws_rx rx = { 0 };
	const char *m;
	size_t n;
	int code;

	(void)state;
	/* A frame header announcing more than the cap: refused at once. */
	assert_int_equal(feed(&rx, "abc", true, false, false, 100, &m, &n, &code), WS_RX_REFUSED);
	assert_int_equal(code, WS_CLOSE_TOO_LARGE);
	assert_true(rx.discarding);
	assert_int_equal(feed(&rx, "more", false, false, false, 0, &m, &n, &code), WS_RX_MORE);
	assert_int_equal(feed(&rx, "end", false, true, false, 0, &m, &n, &code), WS_RX_CLOSE);
	assert_int_equal(code, WS_CLOSE_TOO_LARGE);
	assert_false(rx.discarding);
	/* Fragments that only add up to too much. */
	memset(&rx, 0, sizeof(rx));
	assert_int_equal(feed(&rx, "abcdef", true, false, false, 0, &m, &n, &code), WS_RX_MORE);
	assert_int_equal(feed(&rx, "ghijk", false, true, false, 0, &m, &n, &code), WS_RX_REFUSED);
	assert_false(rx.discarding); /* whole already: close now */
	assert_int_equal(rx.buf.cap, 0); /* nothing kept */
	/* A message that never ends is cut off past discard_max (25). */
	assert_int_equal(feed(&rx, "0123456789x", true, false, false, 0, &m, &n, &code), WS_RX_REFUSED);
	assert_int_equal(feed(&rx, "0123456789", false, false, false, 0, &m, &n, &code), WS_RX_MORE);
	assert_int_equal(feed(&rx, "0123456789", false, false, false, 0, &m, &n, &code), WS_RX_CLOSE);
	ws_rx_free(&rx);
}

static void test_binary_refused(void **state)
{
	struct ws_rx rx = { 0 };
	const char *m;
	size_t n;
	int code;

	(void)state;
	assert_int_equal(feed(&rx, "", true, true, true, 0, &m, &n, &code), WS_RX_REFUSED);
	assert_int_equal(code, WS_CLOSE_UNSUPPORTED);
	assert_false(rx.discarding);
	assert_int_equal(feed(&rx, "ab", true, false, true, 0, &m, &n, &code), WS_RX_REFUSED);
	assert_true(rx.discarding);
	assert_int_equal(feed(&rx, "cd", false, true, true, 0, &m, &n, &code), WS_RX_CLOSE);
	assert_int_equal(code, WS_CLOSE_UNSUPPORTED);
	ws_rx_free(&rx);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_whole_and_fragmented),
		cmocka_unit_test(test_too_large_is_dropped_then_closed),
		cmocka_unit_test(test_binary_refused),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
