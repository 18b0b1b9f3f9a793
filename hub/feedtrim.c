/*
 * feedtrim.c - the feed follows its slowest sink (hub/feedtrim.h). Once a
 * second, for every ingest shard, one call of hub/lua/feedtrim.lua reads the
 * shard's consumer groups, trims the feed to what every group and the
 * dashboards allow, and reports the length, entries-added and last id. The
 * dashboards' cut comes from those reports: a small history per shard of
 * (entries-added, last id) samples, halved when full; the newest sample at
 * least feed-stream-maxlen entries old is the cut. Every hub runs it; the
 * trims are idempotent. Nothing here is on the store path except
 * hub_feedtrim_store_maxlen, an array read.
 */
#include "hub/feedtrim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libwebsockets.h>

#include "hub/hub.h"
#include "hub/ingest.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub_lua.h"

#define TICK_US      (1000 * 1000)
#define FIRST_US     (50 * 1000)   /* until every shard was checked once */
#define SAMPLES      128           /* history per shard; halved when full */
#define ID_MAX       48            /* "<ms>-<seq>" */
#define GROUP_MAX    64            /* a group name as reported (truncated) */

struct sample {
	long long added;
	char id[ID_MAX];
};

struct ft_shard {
	struct hub_feedtrim *ft;
	unsigned k;
	bool known;                /* a report arrived */
	bool in_flight;
	bool over;                 /* the slowest group is beyond the bound */
	long long groups, length, unread;
	char worst[GROUP_MAX];
	struct sample s[SAMPLES];
	size_t ns;
};

struct hub_feedtrim {
	struct hub *hub;
	int script;
	bool stopped;
	lws_sorted_usec_list_t sul;
	uint64_t trimmed_total, over_total;
	struct ft_shard shard[HUB_FEED_SHARDS_MAX];
};

static bool enabled(const struct hub *hub)
{
	return hub->cfg.feed_stream_maxlen > 0 && hub->cfg.feed_sink_max_lag > 0;
}

long hub_feedtrim_store_maxlen(const struct hub *hub, unsigned shard)
{
	const struct hub_feedtrim *ft = hub->feedtrim;
	long fmax = hub->cfg.feed_stream_maxlen;

	if (!fmax || !enabled(hub) || !ft || shard >= HUB_FEED_SHARDS_MAX)
		return fmax;
	if (ft->shard[shard].known && !ft->shard[shard].groups)
		return fmax;
	return fmax + hub->cfg.feed_sink_max_lag;
}

/* The newest sample at least feed-stream-maxlen entries before `added`;
 * older samples are dropped (the cut only moves forward). NULL: none. */
static const char *dash_cut(struct ft_shard *S, long long added, long fmax)
{
	size_t i = S->ns, at;

	while (i && S->s[i - 1].added > added - fmax)
		i--;
	if (!i)
		return NULL;
	at = i - 1;
	if (at) {
		memmove(S->s, S->s + at, (S->ns - at) * sizeof(S->s[0]));
		S->ns -= at;
	}
	return S->s[0].id;
}

static void sample_add(struct ft_shard *S, long long added, const char *id)
{
	if (S->ns && added < S->s[S->ns - 1].added)
		S->ns = 0; /* the stream was recreated (Redis came back empty) */
	if (S->ns && added == S->s[S->ns - 1].added)
		return;
	if (S->ns == SAMPLES) {
		for (size_t i = 0; i < SAMPLES / 2; i++)
			S->s[i] = S->s[2 * i + 1];
		S->ns = SAMPLES / 2;
	}
	S->s[S->ns].added = added;
	snprintf(S->s[S->ns].id, ID_MAX, "%s", id);
	S->ns++;
}

static long long el_int(const redisReply *r, size_t i)
{
	return r->element[i]->type == REDIS_REPLY_INTEGER ? r->element[i]->integer : 0;
}

static const char *el_str(const redisReply *r, size_t i)
{
	return r->element[i]->type == REDIS_REPLY_STRING ? r->element[i]->str : "";
}

static void check_bound(struct hub_feedtrim *ft, struct ft_shard *S)
{
	long bound = ft->hub->cfg.feed_sink_max_lag;
	bool over = S->groups && S->unread > bound;

	if (over && !S->over) {
		ft->over_total++;
		hub_warn("feed: shard %u: sink group %s is %lld frames behind, beyond "
			 "feed-sink-max-lag %ld: the feed is trimmed at %ld frames anyway and that "
			 "sink will miss frames (a gap)", S->k, S->worst, S->unread, bound,
			 ft->hub->cfg.feed_stream_maxlen + bound);
	} else if (!over && S->over) {
		hub_info("feed: shard %u: its sinks are within feed-sink-max-lag again", S->k);
	}
	S->over = over;
}

static void on_report(redisReply *r, void *arg)
{
	struct ft_shard *S = arg;
	struct hub_feedtrim *ft = S->ft;

	S->in_flight = false;
	if (ft->stopped || !r)
		return;
	if (r->type != REDIS_REPLY_ARRAY || r->elements != 7) {
		hub_warn("feed: shard %u: trim check failed: %s", S->k,
			 r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
		return;
	}
	S->known = true;
	S->groups = el_int(r, 0);
	S->length = el_int(r, 1);
	snprintf(S->worst, sizeof(S->worst), "%s", el_str(r, 4));
	S->unread = el_int(r, 5);
	ft->trimmed_total += (uint64_t)el_int(r, 6);
	sample_add(S, el_int(r, 2), el_str(r, 3));
	check_bound(ft, S);
}

static void check_shard(struct hub_feedtrim *ft, struct ft_shard *S)
{
	struct hub *hub = ft->hub;
	char key[HUB_KEY_MAX], nk[4] = "1";
	const char *cut = NULL;

	if (S->in_flight || !hub_key_feed(key, sizeof(key), S->k))
		return;
	if (S->ns)
		cut = dash_cut(S, S->s[S->ns - 1].added, hub->cfg.feed_stream_maxlen);
	const char *argv[] = { "EVALSHA", hub_redis_script_sha(hub->redis, ft->script), nk, key,
			       cut ? cut : "" };
	if (!hub_redis_command_argv(hub->redis, on_report, S, 5, argv, NULL))
		S->in_flight = true;
}

static void tick(lws_sorted_usec_list_t *sul)
{
	struct hub_feedtrim *ft = lws_container_of(sul, struct hub_feedtrim, sul);
	struct hub *hub = ft->hub;
	unsigned n = hub_redis_up(hub->redis) ? hub_ingest_shards(hub) : 0;
	bool all = n > 0;

	for (unsigned k = 0; k < n; k++) {
		check_shard(ft, &ft->shard[k]);
		all = all && ft->shard[k].known;
	}
	/* Until a shard was checked, its store MAXLEN is the raised bound (a
	 * sink may exist): check soon after start so that a feed without
	 * sinks is trimmed as usual from the first frames on. */
	lws_sul_schedule(hub->ctx, 0, &ft->sul, tick, all ? TICK_US : FIRST_US);
}

void hub_feedtrim_expose(const struct hub *hub, hub_buf *o)
{
	const struct hub_feedtrim *ft = hub->feedtrim;
	unsigned n = 0;

	if (!ft)
		return;
	hub_buf_printf(o, "# HELP iot_hub_feed_sink_lag_frames Frames of the feed shard its "
		       "slowest sink group has not acknowledged (-1: unknown).\n"
		       "# TYPE iot_hub_feed_sink_lag_frames gauge\n");
	for (unsigned k = 0; k < HUB_FEED_SHARDS_MAX; k++) {
		const struct ft_shard *S = &ft->shard[k];
		if (!S->known || !S->groups)
			continue;
		hub_buf_printf(o, "iot_hub_feed_sink_lag_frames{shard=\"%u\",group=\"%s\"} %lld\n",
			       k, S->worst, S->unread);
		n += S->over;
	}
	hub_buf_printf(o, "# HELP iot_hub_feed_sink_over_bound Feed shards whose slowest sink "
		       "is beyond feed-sink-max-lag.\n# TYPE iot_hub_feed_sink_over_bound gauge\n"
		       "iot_hub_feed_sink_over_bound %u\n", n);
	hub_buf_printf(o, "# HELP iot_hub_feed_sink_over_bound_total Times a feed shard's slowest "
		       "sink went beyond feed-sink-max-lag.\n"
		       "# TYPE iot_hub_feed_sink_over_bound_total counter\n"
		       "iot_hub_feed_sink_over_bound_total %llu\n",
		       (unsigned long long)ft->over_total);
	hub_buf_printf(o, "# HELP iot_hub_feed_trimmed_total Feed entries trimmed by the sink-aware "
		       "trim.\n# TYPE iot_hub_feed_trimmed_total counter\n"
		       "iot_hub_feed_trimmed_total %llu\n", (unsigned long long)ft->trimmed_total);
}

static int feedtrim_start(struct hub *hub, char *err, size_t errlen)
{
	struct hub_feedtrim *ft;

	(void)err;
	(void)errlen;
	if (!enabled(hub))
		return 0;
	ft = hub_xcalloc(1, sizeof(*ft));
	hub->feedtrim = ft;
	ft->hub = hub;
	for (unsigned k = 0; k < HUB_FEED_SHARDS_MAX; k++) {
		ft->shard[k].ft = ft;
		ft->shard[k].k = k;
	}
	ft->script = hub_redis_add_script(hub->redis, hub_lua_feedtrim);
	lws_sul_schedule(hub->ctx, 0, &ft->sul, tick, FIRST_US);
	return 0;
}

static void feedtrim_stop(struct hub *hub)
{
	struct hub_feedtrim *ft = hub->feedtrim;

	if (!ft)
		return;
	ft->stopped = true;
	lws_sul_cancel(&ft->sul);
}

static void feedtrim_free(struct hub *hub)
{
	free(hub->feedtrim);
	hub->feedtrim = NULL;
}

const struct hub_module hub_feedtrim_module = {
	.name = "feedtrim",
	.start = feedtrim_start,
	.stop = feedtrim_stop,
	.free = feedtrim_free,
};
