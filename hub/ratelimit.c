#include "hub/ratelimit.h"

#include <math.h>

void hub_bucket_init(hub_bucket *b, double burst, int64_t now_us)
{
	b->tokens = burst;
	b->last_us = now_us;
}

int64_t hub_bucket_take(hub_bucket *b, double rate, double burst, double n,
			int64_t now_us)
{
	if (rate <= 0)
		return 0;
	if (now_us > b->last_us) {
		b->tokens += (double)(now_us - b->last_us) * rate / 1e6;
		if (b->tokens > burst)
			b->tokens = burst;
		b->last_us = now_us;
	}
	if (b->tokens >= n) {
		b->tokens -= n;
		return 0;
	}
	double want = (n > burst ? burst : n) - b->tokens;
	int64_t ms = (int64_t)ceil(want * 1000.0 / rate);
	return ms < 1 ? 1 : ms;
}

static double tokens_at(const hub_bucket *b, double rate, double burst, int64_t now_us)
{
	double t = b->tokens;

	if (now_us > b->last_us)
		t += (double)(now_us - b->last_us) * rate / 1e6;
	return t > burst ? burst : t;
}

int64_t hub_bucket_tat_ms(const hub_bucket *b, double rate, double burst,
			  int64_t now_us, int64_t now_ms)
{
	if (rate <= 0)
		return 0;
	double missing = burst - tokens_at(b, rate, burst, now_us);
	return now_ms + (int64_t)ceil(missing * 1000.0 / rate);
}

void hub_bucket_merge_tat(hub_bucket *b, int64_t tat_ms, double rate, double burst,
			  int64_t now_us, int64_t now_ms)
{
	if (rate <= 0 || tat_ms <= now_ms)
		return;
	double t = tokens_at(b, rate, burst, now_us);
	double stored = burst - (double)(tat_ms - now_ms) * rate / 1000.0;
	b->tokens = stored < t ? stored : t;  /* may be negative: a debt */
	b->last_us = now_us;
}
