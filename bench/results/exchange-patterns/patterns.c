/* Exchange patterns at small sizes: which one costs what (device experiment). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define SLOT 128
static int n, r;
static unsigned char sendb[SLOT], held[16 * 64 * SLOT + 8], inbox[16 * 64 * SLOT + 8], recvb[64 * SLOT];
static void waitpoll(MPI_Request *q) { int done = 0; while (!done) MPI_Testall(2, q, &done, MPI_STATUSES_IGNORE); }
static void rt(void *out, int olen, int dest, int src, int poll) {
    if (!poll) { MPI_Sendrecv(out, olen, MPI_BYTE, dest, 7, inbox, sizeof inbox, MPI_BYTE, src, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE); return; }
    MPI_Request q[2];
    MPI_Irecv(inbox, sizeof inbox, MPI_BYTE, src, 7, MPI_COMM_WORLD, &q[0]);
    MPI_Isend(out, olen, MPI_BYTE, dest, 7, MPI_COMM_WORLD, &q[1]);
    waitpoll(q);
}
static void bruck(int poll) {
    int have = 1; memcpy(held, sendb, SLOT);
    for (int d = 1; d < n; d *= 2) {
        int c = have < d ? have : d; if (c > n - d) c = n - d;
        rt(held, c * SLOT, (r - d + n) % n, (r + d) % n, poll);
        int got = c; memcpy(held + have * SLOT, inbox, got * SLOT); have += got;
    }
    for (int i = 0; i < n; i++) memcpy(recvb + ((r + i) % n) * SLOT, held + i * SLOT, SLOT);
}
static void xorgather(int poll) {
    memcpy(recvb + r * SLOT, sendb, SLOT);
    for (int d = 1; d < n; d *= 2) {
        int p = r ^ d, mine = r & ~(d - 1), theirs = p & ~(d - 1);
        rt(recvb + mine * SLOT, d * SLOT, p, p, poll);
        memcpy(recvb + theirs * SLOT, inbox, d * SLOT);
    }
}
static unsigned char blk[136];
static void dissem_or(void) {
    for (int d = 1; d < n; d *= 2) {
        rt(blk, 136, (r - d + n) % n, (r + d) % n, 1);
        for (int i = 0; i < 136; i++) blk[i] |= inbox[i];
    }
}
static void xor_or(void) {
    for (int d = 1; d < n; d *= 2) {
        rt(blk, 136, r ^ d, r ^ d, 1);
        for (int i = 0; i < 136; i++) blk[i] |= inbox[i];
    }
}
static unsigned char ar_out[136];
#define NM 9
static const char *names[NM] = {"Allgather128", "bruck_poll", "bruck_sendrecv", "xor_poll", "Barrier", "dissem_or136", "xor_or136", "Allreduce_bor136", "Allgather64"};
static void one(int m) {
    switch (m) {
    case 0: MPI_Allgather(sendb, SLOT, MPI_BYTE, recvb, SLOT, MPI_BYTE, MPI_COMM_WORLD); break;
    case 1: bruck(1); break;
    case 2: bruck(0); break;
    case 3: xorgather(1); break;
    case 4: MPI_Barrier(MPI_COMM_WORLD); break;
    case 5: dissem_or(); break;
    case 6: xor_or(); break;
    case 7: MPI_Allreduce(blk, ar_out, 136, MPI_BYTE, MPI_BOR, MPI_COMM_WORLD); break;
    case 8: MPI_Allgather(sendb, 64, MPI_BYTE, recvb, 64, MPI_BYTE, MPI_COMM_WORLD); break;
    }
}
static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_size(MPI_COMM_WORLD, &n); MPI_Comm_rank(MPI_COMM_WORLD, &r);
    int pow2 = (n & (n - 1)) == 0, iters = 5000, rounds = 11;
    double res[NM][32];
    for (int m = 0; m < NM; m++) { if ((m == 3 || m == 6) && !pow2) continue; for (int i = 0; i < 1000; i++) one(m); }
    for (int k = 0; k < rounds; k++)
        for (int j = 0; j < NM; j++) {
            int m = (j + k) % NM;
            if ((m == 3 || m == 6) && !pow2) { res[m][k] = 0; continue; }
            for (int i = 0; i < 200; i++) one(m);
            MPI_Barrier(MPI_COMM_WORLD);
            double t0 = MPI_Wtime();
            for (int i = 0; i < iters; i++) one(m);
            double t = (MPI_Wtime() - t0) / iters * 1e6, mx;
            MPI_Allreduce(&t, &mx, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
            res[m][k] = mx;
        }
    if (r == 0) {
        printf("n=%d (median of %d rounds of %d, slowest rank, us)\n", n, rounds, iters);
        for (int m = 0; m < NM; m++) { qsort(res[m], rounds, sizeof(double), cmp); printf("  %-18s %7.2f\n", names[m], res[m][rounds / 2]); }
    }
    MPI_Finalize();
    return 0;
}
