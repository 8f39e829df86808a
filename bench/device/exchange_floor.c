/* The floor of typedcoll's exchange form, in C without Python, against MPI's own collectives
 * (docs/bench.md, "The exchange's floor and its radix"; the figures there are this program's).
 *
 * Every typed collective starts with one exchange: rounds of point-to-point messages posted
 * with MPI_Isend/MPI_Irecv and polled with MPI_Testall (transports/mpi.py writes the schedule
 * down; core/_speedups.c runs it). This times that schedule alone for radix k (round j sends
 * to and receives from the k - 1 peers at distances i * k**j at once; typedcoll uses k = 2), in
 * both shapes: "reduce" (136-byte messages, an 8-byte prefix and the 128-byte agreement block,
 * ORed along; "reduce8B": the same rounds with 8-byte messages) and "gather" (Bruck's allgather
 * of 128-byte slots); and MPI_Barrier, MPI_Bcast of 136 bytes, MPI_Allreduce (MPI_BOR) of 128
 * bytes and MPI_Allgather of 64 bytes. Each figure: the slowest rank's mean per call over ITERS
 * calls; three repetitions, rep=0 a warm-up.
 *
 *   mpicc -O2 bench/device/exchange_floor.c -o /tmp/exchange_floor
 *   mpirun --oversubscribe --bind-to core -n 16 /tmp/exchange_floor [ITERS]
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#define SLOT 128
#define PREFIX 8
#define AGREE 128
static int n, r;
static unsigned char *held, *inbox[64], *buf, out[PREFIX + AGREE + SLOT];
static void waitall(int cnt, MPI_Request *q) {
    int flag = 0;
    while (!flag) MPI_Testall(cnt, q, &flag, MPI_STATUSES_IGNORE);
}
static int small_msgs = 0;
static void exchange(int k, int gather) {
    MPI_Request q[128];
    int have = 1;
    for (int d = 1; d < n; d *= k) {
        int c = 0;
        for (int i = 1; i < k && i * d < n; i++) {
            int src = (r + i * d) % n, dst = ((r - i * d) % n + n) % n;
            int cnt = gather ? (have < n - i * d ? have : n - i * d) : 0;
            MPI_Irecv(inbox[i], PREFIX + AGREE + n * SLOT, MPI_BYTE, src, 7, MPI_COMM_WORLD, &q[c++]);
            if (gather) MPI_Isend(held, PREFIX + cnt * SLOT, MPI_BYTE, dst, 7, MPI_COMM_WORLD, &q[c++]);
            else MPI_Isend(out, small_msgs ? PREFIX : PREFIX + AGREE, MPI_BYTE, dst, 7, MPI_COMM_WORLD, &q[c++]);
        }
        waitall(c, q);
        for (int i = 1; i < k && i * d < n; i++) {
            if (gather) {
                int cnt = have < n - i * d ? have : n - i * d;
                memcpy(held + PREFIX + (i * d) * SLOT, inbox[i] + PREFIX, cnt * SLOT);
            } else {
                for (int b = 0; b < AGREE; b++) out[PREFIX + b] |= inbox[i][PREFIX + b];
            }
        }
        have = have * k < n ? have * k : n;
    }
}
static double timeit(int mode, int k, int iters) {
    unsigned char small[AGREE];
    memset(small, 0, sizeof small);
    for (int w = 0; w < iters / 10; w++) {
        if (mode == 0) exchange(k, 0); else if (mode == 1) exchange(k, 1);
        else if (mode == 2) MPI_Barrier(MPI_COMM_WORLD);
        else if (mode == 3) MPI_Bcast(buf, 136, MPI_BYTE, 0, MPI_COMM_WORLD);
        else if (mode == 4) MPI_Allreduce(MPI_IN_PLACE, small, AGREE, MPI_BYTE, MPI_BOR, MPI_COMM_WORLD);
        else MPI_Allgather(small, 64, MPI_BYTE, buf, 64, MPI_BYTE, MPI_COMM_WORLD);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    double t = MPI_Wtime();
    for (int w = 0; w < iters; w++) {
        if (mode == 0) exchange(k, 0); else if (mode == 1) exchange(k, 1);
        else if (mode == 2) MPI_Barrier(MPI_COMM_WORLD);
        else if (mode == 3) MPI_Bcast(buf, 136, MPI_BYTE, 0, MPI_COMM_WORLD);
        else if (mode == 4) MPI_Allreduce(MPI_IN_PLACE, small, AGREE, MPI_BYTE, MPI_BOR, MPI_COMM_WORLD);
        else MPI_Allgather(small, 64, MPI_BYTE, buf, 64, MPI_BYTE, MPI_COMM_WORLD);
    }
    t = (MPI_Wtime() - t) / iters * 1e6;
    double mx;
    MPI_Allreduce(&t, &mx, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    return mx;
}
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    held = calloc(PREFIX + n * SLOT, 1);
    buf = calloc(136 + n * 64, 1); /* the bcast's 136 bytes or the allgather's n * 64 */
    for (int i = 0; i < 64; i++) inbox[i] = calloc(PREFIX + AGREE + n * SLOT, 1);
    int iters = argc > 1 ? atoi(argv[1]) : 20000;
    int ks[] = {2, 3, 4, 8, 16, 32};
    const char *names[] = {"barrier", "bcast136", "allreduce128", "allgather64"};
    for (int rep = 0; rep < 3; rep++) {
        for (int j = 2; j < 6; j++) {
            double t = timeit(j, 0, iters);
            if (r == 0) printf("n=%d rep=%d %-14s %.2f us\n", n, rep, names[j - 2], t);
        }
        for (int ki = 0; ki < 6; ki++) {
            int k = ks[ki];
            if (ki > 0 && ks[ki - 1] >= n) break; /* a radix past n repeats the one before */
            double a = timeit(0, k, iters), b = timeit(1, k, iters);
            small_msgs = 1; double c = timeit(0, k, iters); small_msgs = 0;
            if (r == 0) printf("n=%d rep=%d radix=%-2d reduce %.2f us  gather %.2f us  reduce8B %.2f us\n", n, rep, k, a, b, c);
        }
    }
    MPI_Finalize();
    return 0;
}
