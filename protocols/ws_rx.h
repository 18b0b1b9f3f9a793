/*
 * ws_rx.h - one WebSocket message out of the pieces lws delivers, for both
 * of the hub's protocols: text only, reassembled into a capped buffer, and a
 * refused message (binary, or over the cap) read to its end and dropped
 * before the connection is closed (closing with unread data resets the
 * socket and the peer sees 1006 instead of the close code). A message that
 * never ends is cut off after discard_max bytes. No lws include: the caller
 * passes what lws reports about the piece; unit-tested alone.
 */
#ifndef HUB_WS_RX_H
#define HUB_WS_RX_H

#include <stdbool.h>
#include <stddef.h>

#include "hub/util.h"

struct ws_rx {
	hub_buf buf;               /* a message's pieces so far */
	size_t discarded;
	const char *reason;        /* static */
	int code;                  /* the close code once it is dropped */
	bool discarding;           /* dropping the rest of a refused message */
};

/* What lws says of one received piece. */
struct ws_piece {
	const char *in;
	size_t len;
	bool first;                /* lws_is_first_fragment */
	bool final;                /* lws_is_final_fragment && no payload remaining */
	bool binary;               /* lws_frame_is_binary */
	size_t remaining;          /* lws_remaining_packet_payload */
};

enum ws_rx_result {
	WS_RX_MORE,                /* nothing to do yet */
	WS_RX_MESSAGE,             /* *msg, *msglen: a whole message; then ws_rx_done() */
	WS_RX_REFUSED,             /* binary or too large (*code, *reason): being dropped,
				    * or already whole: close now when !rx->discarding */
	WS_RX_CLOSE,               /* a refused message is dropped: close (*code, *reason) */
};

/* Feeds one piece. max: the largest message; discard_max: what a refused
 * message may still send before the connection is closed at once. A
 * message may point into the piece itself (not copied) or into rx->buf;
 * either lives until the next call. */
enum ws_rx_result ws_rx_feed(struct ws_rx *rx, const struct ws_piece *p, size_t max,
			     size_t discard_max, const char **msg, size_t *msglen,
			     int *code, const char **reason);

/* After a message was handled: empties the buffer, freeing it if it grew
 * past keep bytes. */
void ws_rx_done(struct ws_rx *rx, size_t keep);

void ws_rx_free(struct ws_rx *rx);

#define WS_CLOSE_UNSUPPORTED 1003
#define WS_CLOSE_TOO_LARGE   1009

#endif
