/*
 * test_outbox.c - the spool of libiothub-gw (sdk/c/src/outbox.c) against the
 * crash model of docs/sdk.md: a spool is built (readings, frames, acks, over
 * several segments), closed, then its last segment is cut at many points (a
 * torn tail) or has garbage appended, and reopened. After every reopen:
 *  - a frame that comes back has the seq and readings it had (never other
 *    readings under a seq, never a reading in two frames);
 *  - no acked frame comes back, every unacked frame whose F record survived
 *    does, and readings come back in rid order, each once;
 *  - the next seq is above every seq used.
 * Also: the bound refuses with IOTHUB_GW_ESPOOL_FULL and nothing is written;
 * compaction deletes segments once acked. Exit 0 when all hold.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../src/internal.h"

#define N_READINGS 600
#define MAX_FR     64

static int failures;

#define CHECK(c, ...) do { if (!(c)) { failures++; fprintf(stderr, "FAIL %s:%d: ", __FILE__, \
	__LINE__); fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); } } while (0)

struct ref {
	uint64_t seq[MAX_FR * 20], first[MAX_FR * 20], n[MAX_FR * 20];
	int acked[MAX_FR * 20];
	size_t nf;
	uint64_t next_seq;
};

static void rm_rf(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	char p[4200];

	while (d && (de = readdir(d)))
		if (de->d_name[0] != '.') {
			snprintf(p, sizeof(p), "%s/%s", dir, de->d_name);
			unlink(p);
		}
	if (d)
		closedir(d);
	rmdir(dir);
}

static void reading(char *buf, size_t cap, int i)
{
	snprintf(buf, cap, "{\"device\":\"t-%d\",\"ts\":%d,\"data\":{\"temperature\":%d.5}}", i % 3,
		 1000 + i, i % 90);
}

/* Builds the spool: readings in batches, frames of up to 7, every frame but
 * each third acked. Returns the last segment's path in last. */
static void build(const char *dir, struct ref *r, char *last, size_t cap)
{
	struct outbox o;
	char err[256], buf[128];
	int i = 0;

	memset(r, 0, sizeof(*r));
	CHECK(!ob_open(&o, dir, 1u << 20, 4096, IOTHUB_GW_FSYNC_NONE, err, sizeof(err)), "%s", err);
	while (i < N_READINGS) {
		for (int k = 0; k < 25 && i < N_READINGS; k++, i++) {
			reading(buf, sizeof(buf), i);
			CHECK(!ob_append(&o, buf, strlen(buf), 1, err, sizeof(err)), "append %s", err);
		}
		while (ob_unframed(&o, NULL) > 5 && !ob_make_frame(&o, 7, 60000)) {
			struct ob_frame *f = &o.fr[o.fr_len - 1];

			r->seq[r->nf] = f->seq;
			r->first[r->nf] = f->first_rid;
			r->n[r->nf] = f->n;
			r->nf++;
		}
		for (size_t k = 0; k < r->nf; k++)
			if (!r->acked[k] && r->seq[k] % 3) {
				ob_acked(&o, r->seq[k]);
				r->acked[k] = 1;
			}
	}
	r->next_seq = o.next_seq;
	snprintf(last, cap, "%s/seg-%016" PRIx64 ".log", dir, o.cur_seg);
	ob_close(&o);
}

static const struct ref *ref_g;

static int ref_index(const struct ref *r, uint64_t seq)
{
	for (size_t k = 0; k < r->nf; k++)
		if (r->seq[k] == seq)
			return (int)k;
	return -1;
}

static void check_reopen(const char *dir, const struct ref *r, int intact)
{
	struct outbox o;
	char err[256], buf[128];
	uint64_t prev_rid = 0, prev_seq = 0;

	if (ob_open(&o, dir, 1u << 20, 4096, IOTHUB_GW_FSYNC_NONE, err, sizeof(err))) {
		CHECK(0, "reopen: %s", err);
		return;
	}
	for (size_t i = o.rd_head; i < o.rd_len; i++) {
		CHECK(o.rd[i].rid > prev_rid, "rids out of order");
		prev_rid = o.rd[i].rid;
		reading(buf, sizeof(buf), (int)o.rd[i].rid - 1);
		CHECK(!strcmp(buf, o.rd[i].json), "reading %" PRIu64 " changed", o.rd[i].rid);
	}
	for (size_t i = o.fr_head; i < o.fr_len; i++) {
		int k = ref_index(r, o.fr[i].seq);

		CHECK(o.fr[i].seq > prev_seq, "frames out of seq order");
		prev_seq = o.fr[i].seq;
		CHECK(k >= 0, "a frame with an unknown seq %" PRIu64, o.fr[i].seq);
		if (k < 0)
			continue;
		CHECK(!r->acked[k] || !intact, "acked frame %" PRIu64 " came back", o.fr[i].seq);
		CHECK(o.fr[i].first_rid == r->first[k] && o.fr[i].n == r->n[k],
		      "frame %" PRIu64 " holds other readings", o.fr[i].seq);
	}
	if (intact)
		for (size_t k = 0; k < r->nf; k++)
			CHECK(r->acked[k] || ob_frame(&o, r->seq[k]), "unacked frame %" PRIu64 " lost",
			      r->seq[k]);
	CHECK(o.next_seq >= (intact ? r->next_seq : prev_seq + 1), "next seq went back");
	/* a new frame over what is left never reuses a seq */
	if (!ob_make_frame(&o, 7, 60000))
		CHECK(ref_index(r, o.fr[o.fr_len - 1].seq) < 0, "a seq used twice");
	ob_close(&o);
}

int main(void)
{
	char tmpl[] = "/tmp/sdk-outbox-XXXXXX", dir[64], last[4300], err[256];
	struct ref r;
	struct stat st;
	int cuts = 0;

	if (!mkdtemp(tmpl))
		return 1;
	snprintf(dir, sizeof(dir), "%s/s", tmpl);
	ref_g = &r;

	/* intact, then garbage appended */
	build(dir, &r, last, sizeof(last));
	check_reopen(dir, &r, 1);
	rm_rf(dir);
	build(dir, &r, last, sizeof(last));
	{
		FILE *f = fopen(last, "a");

		fputs("deadbeef F 1 2 3\nxx\x01\x02 garbage without a newline", f);
		fclose(f);
	}
	check_reopen(dir, &r, 1);
	rm_rf(dir);

	/* torn tails: the last segment cut every 23 bytes */
	build(dir, &r, last, sizeof(last));
	stat(last, &st);
	rm_rf(dir);
	for (off_t cut = 0; cut < st.st_size; cut += 23, cuts++) {
		build(dir, &r, last, sizeof(last));
		if (truncate(last, cut))
			return 1;
		check_reopen(dir, &r, 0);
		rm_rf(dir);
	}

	/* the bound */
	{
		struct outbox o;
		char buf[128];
		int rc = 0, n = 0;
		size_t before;

		ob_open(&o, dir, 64 * 1024, 8192, IOTHUB_GW_FSYNC_NONE, err, sizeof(err));
		while (!rc) {
			reading(buf, sizeof(buf), n);
			rc = ob_append(&o, buf, strlen(buf), 1, err, sizeof(err));
			n += !rc;
		}
		CHECK(rc == IOTHUB_GW_ESPOOL_FULL, "expected ESPOOL_FULL, got %d", rc);
		CHECK(strstr(err, "spool full") != NULL, "message: %s", err);
		CHECK(o.total_bytes <= 64 * 1024, "over the bound: %zu", o.total_bytes);
		before = o.total_bytes;
		CHECK(ob_append(&o, buf, strlen(buf), 1, err, sizeof(err)) == IOTHUB_GW_ESPOOL_FULL &&
		      o.total_bytes == before, "a refused reading was written");
		/* frame and ack everything: segments go, room comes back */
		while (!ob_make_frame(&o, 50, 60000))
			;
		while (o.fr_len > o.fr_head)
			ob_acked(&o, o.fr[o.fr_head].seq);
		CHECK(o.nsegs == 0 && o.total_bytes < 8192, "not compacted: %zu segments, %zu bytes",
		      o.nsegs, o.total_bytes);
		CHECK(!ob_append(&o, buf, strlen(buf), 1, err, sizeof(err)), "no room after acks");
		ob_close(&o);
		rm_rf(dir);
	}
	rmdir(tmpl);
	printf("outbox: %d torn-tail cuts checked, %d failures\n", cuts, failures);
	return failures ? 1 : 0;
}
