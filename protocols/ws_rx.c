#include "protocols/ws_rx.h"

static enum ws_rx_result refuse(struct ws_rx *rx, const struct ws_piece *p, int code,
				const char *reason, int *out_code, const char **out_reason)
{
	rx->discarded = rx->buf.len + p->len;
	hub_buf_free(&rx->buf);
	rx->code = code;
	rx->reason = reason;
	rx->discarding = !p->final;
	*out_code = code;
	*out_reason = reason;
	return WS_RX_REFUSED;
}

enum ws_rx_result ws_rx_feed(struct ws_rx *rx, const struct ws_piece *p, size_t max,
			     size_t discard_max, const char **msg, size_t *msglen,
			     int *code, const char **reason)
{
	if (rx->discarding) {
		rx->discarded += p->len;
		if (!p->final && rx->discarded <= discard_max)
			return WS_RX_MORE;
		rx->discarding = false;
		*code = rx->code;
		*reason = rx->reason;
		return WS_RX_CLOSE;
	}
	/* Text frames only (lws marks every fragment of a binary message). */
	if (p->binary)
		return refuse(rx, p, WS_CLOSE_UNSUPPORTED, "binary messages are not supported",
			      code, reason);
	if (rx->buf.len + p->len + p->remaining > max)
		return refuse(rx, p, WS_CLOSE_TOO_LARGE, "message too large", code, reason);
	if (!rx->buf.len && p->first && p->final) {
		*msg = p->in;
		*msglen = p->len;
		return WS_RX_MESSAGE;
	}
	hub_buf_append(&rx->buf, p->in, p->len);
	if (!p->final)
		return WS_RX_MORE;
	*msg = rx->buf.data;
	*msglen = rx->buf.len;
	return WS_RX_MESSAGE;
}

void ws_rx_done(struct ws_rx *rx, size_t keep)
{
	if (rx->buf.cap > keep)
		hub_buf_free(&rx->buf);
	rx->buf.len = 0;
}

void ws_rx_free(struct ws_rx *rx)
{
	hub_buf_free(&rx->buf);
	rx->discarding = false;
}
