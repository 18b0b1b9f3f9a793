/*
 * outbox.c - the gateway's outbox: accepted readings, the frames made of
 * them, and the append-only spool on disk that lets both survive a crash or
 * a reboot (docs/sdk.md, "The spool").
 *
 * The spool is a directory of segment files seg-<n>.log, appended to and
 * never rewritten. Each record is one line "<crc32 hex> <body>\n", the CRC
 * over the body:
 *   H <next_rid> <next_seq>   first line of every segment: the counters
 *   R <rid> <reading json>    an accepted reading
 *   F <seq> <first_rid> <n>   the frame seq holds n readings from first_rid
 *   A <seq>                   the hub acked frame seq
 *   S <seq_limit>             frames may use seqs below seq_limit (fsynced
 *                             under every policy before such a frame exists)
 * Replay reads the segments in order up to the first line that is torn or
 * fails its CRC (the tail of the last segment is cut there): frames with an
 * F and no A are resent with the same seq and readings, readings in no frame
 * are framed anew. A reopened spool continues at the last seq_limit, so a
 * frame whose F record a power cut took (fsync none) never gives its seq to
 * other readings: the hub would ack those as a duplicate and drop them. A closed segment is deleted once every reading up to the
 * point it was closed at is acked (nothing in it is needed any more); the
 * current segment always exists, so its H keeps seq increasing.
 * Not thread-safe: the gateway holds its mutex around every call.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define SEG_MAX_READ (1u << 30)

static void seg_path(const struct outbox *o, uint64_t no, char *buf, size_t cap)
{
	snprintf(buf, cap, "%s/seg-%016" PRIx64 ".log", o->dir, no);
}

static int do_sync(struct outbox *o)
{
	if (!o->dirty || o->fd < 0)
		return 0;
	if (fdatasync(o->fd))
		return -1;
	o->dirty = 0;
	return 0;
}

/* Appends one record; on a short write cuts the file back. sync: fdatasync
 * after it. Returns 0 or -1 (errno). */
static int write_rec(struct outbox *o, const char *body, size_t len, int sync)
{
	struct gbuf b = { 0 };
	size_t off = 0;
	int rc = 0;

	gbuf_printf(&b, "%08x ", gw_crc32(body, len));
	gbuf_add(&b, body, len);
	gbuf_add(&b, "\n", 1);
	while (off < b.len) {
		ssize_t n = write(o->fd, b.data + off, b.len - off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			int e = n < 0 ? errno : ENOSPC;

			if (ftruncate(o->fd, (off_t)o->cur_bytes)) {
				/* the torn line fails its CRC on replay */
			}
			errno = e;
			rc = -1;
			break;
		}
		off += (size_t)n;
	}
	if (!rc) {
		o->cur_bytes += b.len;
		o->total_bytes += b.len;
		o->dirty = 1;
		if (sync && do_sync(o))
			rc = -1;
	}
	gbuf_free(&b);
	return rc;
}

static int open_segment(struct outbox *o, uint64_t no)
{
	char path[4096], h[64];
	int n;

	seg_path(o, no, path, sizeof(path));
	o->fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
	if (o->fd < 0)
		return -1;
	o->cur_seg = no;
	o->cur_bytes = 0;
	/* the seq floor must outlive the segments that held S records */
	n = snprintf(h, sizeof(h), "H %" PRIu64 " %" PRIu64, o->next_rid,
		     o->seq_limit > o->next_seq ? o->seq_limit : o->next_seq);
	if (write_rec(o, h, (size_t)n, 1))
		return -1;
	if (o->dirfd >= 0)
		fsync(o->dirfd);
	return 0;
}

/* Closes the current segment and starts the next one. */
static int roll(struct outbox *o)
{
	if (o->fd >= 0) {
		do_sync(o);
		close(o->fd);
		o->fd = -1;
	}
	o->segs = gw_xrealloc(o->segs, (o->nsegs + 1) * sizeof(*o->segs));
	o->segs[o->nsegs++] = (struct ob_seg){ o->cur_seg, o->next_rid, o->cur_bytes };
	return open_segment(o, o->cur_seg + 1);
}

static uint64_t low_water(const struct outbox *o)
{
	if (o->fr_len > o->fr_head)
		return o->fr[o->fr_head].first_rid;
	if (o->rd_len > o->rd_head)
		return o->rd[o->rd_head].rid;
	return o->next_rid;
}

static void compact(struct outbox *o)
{
	uint64_t lwm = low_water(o);
	size_t k = 0;
	char path[4096];

	while (k < o->nsegs && o->segs[k].end_rid <= lwm) {
		seg_path(o, o->segs[k].no, path, sizeof(path));
		unlink(path);
		o->total_bytes -= o->segs[k].bytes;
		k++;
	}
	if (k) {
		memmove(o->segs, o->segs + k, (o->nsegs - k) * sizeof(*o->segs));
		o->nsegs -= k;
	}
}

static void rd_push(struct outbox *o, uint64_t rid, const char *json, size_t len)
{
	if (o->rd_head && o->rd_head >= o->rd_len / 2) {
		memmove(o->rd, o->rd + o->rd_head, (o->rd_len - o->rd_head) * sizeof(*o->rd));
		o->rd_len -= o->rd_head;
		o->rd_head = 0;
	}
	if (o->rd_len == o->rd_cap) {
		o->rd_cap = o->rd_cap ? o->rd_cap * 2 : 256;
		o->rd = gw_xrealloc(o->rd, o->rd_cap * sizeof(*o->rd));
	}
	o->rd[o->rd_len].rid = rid;
	o->rd[o->rd_len].json = gw_xmalloc(len + 1);
	memcpy(o->rd[o->rd_len].json, json, len);
	o->rd[o->rd_len].json[len] = 0;
	o->rd[o->rd_len].len = len;
	o->rd_len++;
}

static void fr_push(struct outbox *o, uint64_t seq, uint64_t first, uint32_t n, int state)
{
	if (o->fr_head && o->fr_head >= o->fr_len / 2) {
		memmove(o->fr, o->fr + o->fr_head, (o->fr_len - o->fr_head) * sizeof(*o->fr));
		o->fr_len -= o->fr_head;
		o->fr_head = 0;
	}
	if (o->fr_len == o->fr_cap) {
		o->fr_cap = o->fr_cap ? o->fr_cap * 2 : 64;
		o->fr = gw_xrealloc(o->fr, o->fr_cap * sizeof(*o->fr));
	}
	o->fr[o->fr_len++] = (struct ob_frame){ seq, first, n, state };
}

/* index in rd of the first reading with rid >= rid */
static size_t rd_find(const struct outbox *o, uint64_t rid)
{
	size_t lo = o->rd_head, hi = o->rd_len;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (o->rd[mid].rid < rid)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/* ---- replay ---- */

struct replay {
	struct ob_frame *fr;
	size_t nfr, capfr;
	uint64_t *acked;
	size_t nack, capack;
};

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static int cmp_frame(const void *a, const void *b)
{
	return cmp_u64(&((const struct ob_frame *)a)->seq, &((const struct ob_frame *)b)->seq);
}

/* Applies the valid lines of buf[0..len); returns the length they take. */
static size_t replay_segment(struct outbox *o, struct replay *r, const char *buf, size_t len,
			     uint64_t *hdr_rid, uint64_t *max_rid)
{
	size_t off = 0;

	*hdr_rid = 0;
	*max_rid = 0;
	while (off < len) {
		const char *nl = memchr(buf + off, '\n', len - off), *body;
		size_t blen;
		unsigned long crc;
		char *end, line[128];
		uint64_t a, b, c;

		if (!nl || nl - (buf + off) < 11 || buf[off + 8] != ' ')
			break;
		crc = strtoul(buf + off, &end, 16);
		if (end != buf + off + 8)
			break;
		body = buf + off + 9;
		blen = (size_t)(nl - body);
		if (gw_crc32(body, blen) != (uint32_t)crc || blen < 3 || body[1] != ' ')
			break;
		/* The numeric records, NUL-terminated for sscanf (the segment
		 * buffer is not: sscanf would read past it looking for one). */
		if (body[0] != 'R') {
			if (blen >= sizeof(line))
				goto out;
			memcpy(line, body, blen);
			line[blen] = '\0';
		}
		switch (body[0]) {
		case 'H':
			if (sscanf(line, "H %" SCNu64 " %" SCNu64, &a, &b) != 2)
				goto out;
			*hdr_rid = a;
			if (a > o->next_rid)
				o->next_rid = a;
			if (b > o->next_seq)
				o->next_seq = b;
			break;
		case 'R': {
			const char *j = body + 2;

			a = strtoull(j, &end, 10);
			if (end == j || *end != ' ')
				goto out;
			end++;
			if (o->rd_len > o->rd_head && a <= o->rd[o->rd_len - 1].rid)
				goto out;   /* rids only grow */
			rd_push(o, a, end, (size_t)(nl - end));
			if (a + 1 > o->next_rid)
				o->next_rid = a + 1;
			if (a + 1 > *max_rid)
				*max_rid = a + 1;
			break;
		}
		case 'F':
			if (sscanf(line, "F %" SCNu64 " %" SCNu64 " %" SCNu64, &a, &b, &c) != 3 ||
			    !c || c > 100000)
				goto out;
			if (r->nfr == r->capfr) {
				r->capfr = r->capfr ? r->capfr * 2 : 64;
				r->fr = gw_xrealloc(r->fr, r->capfr * sizeof(*r->fr));
			}
			r->fr[r->nfr++] = (struct ob_frame){ a, b, (uint32_t)c, FR_UNSENT };
			if (a + 1 > o->next_seq)
				o->next_seq = a + 1;
			break;
		case 'S':
			if (sscanf(line, "S %" SCNu64, &a) != 1)
				goto out;
			if (a > o->next_seq)
				o->next_seq = a;
			break;
		case 'A':
			if (sscanf(line, "A %" SCNu64, &a) != 1)
				goto out;
			if (r->nack == r->capack) {
				r->capack = r->capack ? r->capack * 2 : 64;
				r->acked = gw_xrealloc(r->acked, r->capack * sizeof(*r->acked));
			}
			r->acked[r->nack++] = a;
			break;
		default:
			goto out;
		}
		off = (size_t)(nl - buf) + 1;
	}
out:
	return off;
}

static int read_file(const char *path, char **out, size_t *len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	size_t off = 0;

	if (fd < 0)
		return -1;
	if (fstat(fd, &st) || (uint64_t)st.st_size > SEG_MAX_READ) {
		close(fd);
		errno = EFBIG;
		return -1;
	}
	*out = gw_xmalloc((size_t)st.st_size + 1);
	while (off < (size_t)st.st_size) {
		ssize_t n = read(fd, *out + off, (size_t)st.st_size - off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		off += (size_t)n;
	}
	close(fd);
	*len = off;
	return 0;
}

/* After replay: drop acked frames and their readings, keep the rest. rids
 * are dense (every rid below next_rid had its R record), so frame seq holds
 * the readings with rid in [first_rid, first_rid + n). */
static void settle(struct outbox *o, struct replay *r)
{
	size_t i, keep;

	if (r->nfr)
		qsort(r->fr, r->nfr, sizeof(*r->fr), cmp_frame);
	if (r->nack)
		qsort(r->acked, r->nack, sizeof(*r->acked), cmp_u64);
	o->framed_end = 0;
	for (i = 0; i < r->nfr; i++) {
		struct ob_frame *f = &r->fr[i];
		uint64_t end = f->first_rid + f->n;

		if (i && f->seq == r->fr[i - 1].seq)
			continue;
		if (end > o->framed_end)
			o->framed_end = end;
		if (r->nack && bsearch(&f->seq, r->acked, r->nack, sizeof(*r->acked), cmp_u64)) {
			for (size_t k = rd_find(o, f->first_rid); k < o->rd_len &&
			     o->rd[k].rid < end; k++) {
				free(o->rd[k].json);
				o->rd[k].json = NULL;
			}
		} else {
			size_t k = rd_find(o, f->first_rid);

			if (k < o->rd_len && o->rd[k].rid < end)   /* some are left */
				fr_push(o, f->seq, f->first_rid, f->n, FR_UNSENT);
		}
	}
	for (i = o->rd_head, keep = o->rd_head; i < o->rd_len; i++)
		if (o->rd[i].json)
			o->rd[keep++] = o->rd[i];
	o->rd_len = keep;
}

int ob_open(struct outbox *o, const char *dir, size_t max_bytes, size_t seg_bytes,
	    enum iothub_gw_fsync fsync, char *err, size_t errlen)
{
	struct replay r = { 0 };
	uint64_t *nos = NULL;
	size_t nnos = 0, cap = 0, last_valid = 0;
	uint64_t prev_max = 0, prev_hdr = 0;
	struct dirent *de;
	DIR *d;

	memset(o, 0, sizeof(*o));
	o->fd = -1;
	o->dirfd = -1;
	o->dir = gw_xstrdup(dir);
	o->max_bytes = max_bytes;
	o->seg_bytes = seg_bytes;
	o->fsync = fsync;
	o->next_rid = 1;
	if (mkdir(dir, 0700) && errno != EEXIST) {
		snprintf(err, errlen, "spool %.200s: %s", dir, strerror(errno));
		return IOTHUB_GW_EIO;
	}
	d = opendir(dir);
	if (!d) {
		snprintf(err, errlen, "spool %.200s: %s", dir, strerror(errno));
		return IOTHUB_GW_EIO;
	}
	while ((de = readdir(d))) {
		uint64_t no;
		char tail[8];

		if (sscanf(de->d_name, "seg-%16" SCNx64 ".%4s", &no, tail) == 2 &&
		    !strcmp(tail, "log")) {
			if (nnos == cap) {
				cap = cap ? cap * 2 : 16;
				nos = gw_xrealloc(nos, cap * sizeof(*nos));
			}
			nos[nnos++] = no;
		}
	}
	closedir(d);
	o->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (nnos)
		qsort(nos, nnos, sizeof(*nos), cmp_u64);
	for (size_t i = 0; i < nnos; i++) {
		char path[4096], *buf = NULL;
		size_t len = 0, valid;
		uint64_t hdr, maxr;

		seg_path(o, nos[i], path, sizeof(path));
		if (read_file(path, &buf, &len)) {
			snprintf(err, errlen, "spool %.200s: %s", path, strerror(errno));
			free(nos);
			free(r.fr);
			free(r.acked);
			return IOTHUB_GW_EIO;
		}
		valid = replay_segment(o, &r, buf, len, &hdr, &maxr);
		free(buf);
		if (i) {
			uint64_t end = prev_max > prev_hdr ? prev_max : prev_hdr;

			if (hdr > end)
				end = hdr;
			o->segs = gw_xrealloc(o->segs, (o->nsegs + 1) * sizeof(*o->segs));
			o->segs[o->nsegs++] = (struct ob_seg){ nos[i - 1], end, last_valid };
		}
		o->total_bytes += valid;
		prev_max = maxr;
		prev_hdr = hdr;
		last_valid = valid;
		if (i + 1 == nnos && valid < len && truncate(path, (off_t)valid)) {
			snprintf(err, errlen, "spool %.200s: cannot cut a torn tail: %s", path,
				 strerror(errno));
			free(nos);
			free(r.fr);
			free(r.acked);
			return IOTHUB_GW_EIO;
		}
	}
	settle(o, &r);
	free(r.fr);
	free(r.acked);
	if (!nnos) {
		/* a new spool: seq from the clock stays above what a lost one used */
		o->next_seq = (uint64_t)gw_now_ms();
		if (open_segment(o, 1)) {
			snprintf(err, errlen, "spool %.200s: %s", dir, strerror(errno));
			free(nos);
			return IOTHUB_GW_EIO;
		}
	} else {
		char path[4096];

		seg_path(o, nos[nnos - 1], path, sizeof(path));
		o->fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC);
		if (o->fd < 0) {
			snprintf(err, errlen, "spool %.200s: %s", path, strerror(errno));
			free(nos);
			return IOTHUB_GW_EIO;
		}
		o->cur_seg = nos[nnos - 1];
		o->cur_bytes = last_valid;
	}
	free(nos);
	o->seq_limit = o->next_seq;   /* the first frame takes a new lease */
	compact(o);
	return IOTHUB_GW_OK;
}

void ob_close(struct outbox *o)
{
	if (o->fd >= 0) {
		do_sync(o);
		close(o->fd);
	}
	if (o->dirfd >= 0)
		close(o->dirfd);
	for (size_t i = o->rd_head; i < o->rd_len; i++)
		free(o->rd[i].json);
	free(o->rd);
	free(o->fr);
	free(o->segs);
	free(o->dir);
	memset(o, 0, sizeof(*o));
	o->fd = o->dirfd = -1;
}

int ob_append(struct outbox *o, const char *json, size_t len, int bounded, char *err,
	      size_t errlen)
{
	struct gbuf b = { 0 };
	int rc = IOTHUB_GW_OK;

	if (o->cur_bytes >= o->seg_bytes && roll(o)) {
		snprintf(err, errlen, "spool %.200s: %s", o->dir, strerror(errno));
		return IOTHUB_GW_EIO;
	}
	gbuf_printf(&b, "R %" PRIu64 " ", o->next_rid);
	gbuf_add(&b, json, len);
	if (bounded && o->total_bytes + b.len + 10 > o->max_bytes) {
		snprintf(err, errlen, "spool full: %zu of %zu bytes held by unacked readings",
			 o->total_bytes, o->max_bytes);
		rc = IOTHUB_GW_ESPOOL_FULL;
	} else if (write_rec(o, b.data, b.len, o->fsync == IOTHUB_GW_FSYNC_ALWAYS)) {
		snprintf(err, errlen, "spool %.200s: %s", o->dir, strerror(errno));
		rc = errno == ENOSPC ? IOTHUB_GW_ESPOOL_FULL : IOTHUB_GW_EIO;
	} else {
		rd_push(o, o->next_rid++, json, len);
	}
	gbuf_free(&b);
	return rc;
}

size_t ob_unframed(struct outbox *o, size_t *first)
{
	size_t k = rd_find(o, o->framed_end);

	if (first)
		*first = k;
	return o->rd_len - k;
}

int ob_make_frame(struct outbox *o, size_t max, size_t max_bytes)
{
	size_t k, n = 0, bytes = 64, avail = ob_unframed(o, &k);
	char body[96];
	int len;

	if (!avail)
		return -1;
	while (n < avail && n < max && (!n || bytes + o->rd[k + n].len + 1 <= max_bytes)) {
		bytes += o->rd[k + n].len + 1;
		n++;
	}
	if (o->cur_bytes >= o->seg_bytes && roll(o))
		return -1;
	if (o->next_seq >= o->seq_limit) {
		len = snprintf(body, sizeof(body), "S %" PRIu64, o->next_seq + 1024);
		if (write_rec(o, body, (size_t)len, 1))
			return -1;
		o->seq_limit = o->next_seq + 1024;
	}
	len = snprintf(body, sizeof(body), "F %" PRIu64 " %" PRIu64 " %zu", o->next_seq,
		       o->rd[k].rid, n);
	/* the seq of a frame must be on disk before the hub may store it */
	if (write_rec(o, body, (size_t)len, o->fsync != IOTHUB_GW_FSYNC_NONE))
		return -1;
	fr_push(o, o->next_seq++, o->rd[k].rid, (uint32_t)n, FR_UNSENT);
	o->framed_end = o->rd[k + n - 1].rid + 1;
	return 0;
}

struct ob_frame *ob_frame(struct outbox *o, uint64_t seq)
{
	size_t lo = o->fr_head, hi = o->fr_len;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (o->fr[mid].seq < seq)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo < o->fr_len && o->fr[lo].seq == seq ? &o->fr[lo] : NULL;
}

size_t ob_frame_first(struct outbox *o, const struct ob_frame *f)
{
	return rd_find(o, f->first_rid);
}

void ob_acked(struct outbox *o, uint64_t seq)
{
	struct ob_frame *f = ob_frame(o, seq);
	char body[48];
	int len;

	if (!f || f->state == FR_ACKED)
		return;
	len = snprintf(body, sizeof(body), "A %" PRIu64, seq);
	if (o->cur_bytes >= o->seg_bytes)
		roll(o);
	write_rec(o, body, (size_t)len, 0);   /* lost: a resend, acked duplicate */
	f->state = FR_ACKED;
	while (o->fr_head < o->fr_len && o->fr[o->fr_head].state == FR_ACKED) {
		struct ob_frame *h = &o->fr[o->fr_head++];

		while (o->rd_head < o->rd_len && o->rd[o->rd_head].rid < h->first_rid + h->n)
			free(o->rd[o->rd_head++].json);
	}
	if (o->fr_head == o->fr_len)
		o->fr_head = o->fr_len = 0;
	if (o->rd_head == o->rd_len)
		o->rd_head = o->rd_len = 0;
	compact(o);
	/* all acked: start afresh so the last segment can go too */
	if (o->rd_len == o->rd_head && o->cur_bytes >= o->seg_bytes / 2 && !roll(o))
		compact(o);
}

int ob_sync(struct outbox *o)
{
	return do_sync(o);
}

size_t ob_pending(const struct outbox *o)
{
	return o->rd_len - o->rd_head;
}
