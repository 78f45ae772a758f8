using System.CommandLine;
using System.Diagnostics;
using AnyPrecML.Kernels;
using AnyPrecML.Quantization;

namespace AnyPrecML.Cli;

/// <summary>`anyprec bench kernels`: bitplane products against dense fp32 and ONNX Runtime's MatMulNBits, side by side.</summary>
internal static class BenchKernelsCommand
{
    private sealed record Result(string kernel, int rows, int cols, int m, int? bits, double ms, int? layers = null);

    public static Command Create()
    {
        var quick = new Option<bool>("--quick") { Description = "Only 4096×4096 at M=1 (under a minute)." };
        var threads = new Option<int>("--threads") { Description = "Threads for every kernel.", DefaultValueFactory = _ => 2 };
        var layers = new Option<int>("--layers") { Description = "Layers of 4096×11008 in the beyond-cache working set (0: skip).", DefaultValueFactory = _ => 32 };
        var tokens = new Option<int[]>("--tokens", "-m")
        {
            Description = "Tokens per product (M) to measure (default: 1 8 64; with --quick, 1). ANYPREC_FEW_TOKENS=registers or tiles in the environment forces how 2-4 tokens are multiplied, to compare the two.",
            AllowMultipleArgumentsPerToken = true,
        };
        var json = CommonOptions.Json();
        var command = new Command("kernels", "Median milliseconds per call of bitplane y = W_b·x at b = 3..8 next to dense fp32 and MatMulNBits 4-bit (accuracy 0 and 4).")
        {
            quick, threads, layers, tokens, json,
        };
        command.SetAction(r =>
        {
            int t = r.GetValue(threads);
            // An option never given reads as an empty array, not null: the defaults apply then.
            int[] ms = r.GetValue(tokens) is { Length: > 0 } given ? given : r.GetValue(quick) ? [1] : [1, 8, 64];
            if (ms.Any(m => m < 1)) throw new ArgumentException("--tokens must list token counts of 1 or more.");
            using var pool = new KernelThreadPool(t);
            var backend = new CpuBitplaneBackend(pool: pool, accuracy: KernelAccuracy.Float32);
            var int8 = new CpuBitplaneBackend(pool: pool, accuracy: KernelAccuracy.Int8);
            var results = new List<Result>();
            var err = r.Err();
            err.WriteLine($"bitplane fp32: {backend.Name}; int8: {int8.Name}; ONNX Runtime {t} intra-op threads");
            (int Rows, int Cols)[] shapes = r.GetValue(quick) ? [(4096, 4096)] : [(4096, 4096), (11008, 4096), (4096, 11008)];
            int n = r.GetValue(layers);
            bool beyondCache = n > 0 && !r.GetValue(quick);
            var progress = new ConsoleProgress<int>(err, "bench kernels", done => (done, shapes.Length * ms.Length * 16 + (beyondCache ? 14 : 0)), "measurements");
            foreach (var (rows, cols) in shapes)
            {
                var matrix = RandomMatrix(rows, cols, 2, 8, 1);
                var dense = new DenseLinear(RandomFloats((long)rows * cols, 2), rows, cols, pool);
                using var nbits0 = new MatMulNBitsLinear(rows, cols, 0, t);
                using var nbits4 = new MatMulNBitsLinear(rows, cols, 4, t);
                foreach (int m in ms)
                {
                    var x = RandomFloats((long)m * cols, 3);
                    var y = new float[m * rows];
                    for (int b = 3; b <= 8; b++) Add(results, progress, new Result("bitplane", rows, cols, m, b, Median(new BitplaneBenchmarkLinear(matrix, b, backend), x, m, y)));
                    for (int b = 2; b <= 8; b++) Add(results, progress, new Result("bitplane-int8", rows, cols, m, b, Median(new BitplaneBenchmarkLinear(matrix, b, int8), x, m, y)));
                    Add(results, progress, new Result("dense-fp32", rows, cols, m, null, Median(dense, x, m, y)));
                    Add(results, progress, new Result("matmulnbits4-acc0", rows, cols, m, 4, Median(nbits0, x, m, y)));
                    Add(results, progress, new Result("matmulnbits4-acc4", rows, cols, m, 4, Median(nbits4, x, m, y)));
                }
            }
            if (beyondCache) BeyondCache(results, progress, n, backend, int8, pool, t);

            if (r.GetValue(json)) r.WriteJson(new { backend = backend.Name, int8_backend = int8.Name, threads = t, results });
            else
            {
                r.Out().WriteLine("| kernel | rows×cols | M | bits | ms |\n|---|---|---:|---:|---:|");
                foreach (var x in results)
                    r.Out().WriteLine($"| {x.kernel}{(x.layers is int l ? $" ×{l} layers" : "")} | {x.rows}×{x.cols} | {x.m} | {x.bits?.ToString() ?? "-"} | {x.ms:F3} |");
            }
            return 0;
        });
        return command;
    }

    /// <summary>A working set far beyond the last-level cache: every call runs all the layers once, as one decode step would.</summary>
    private static void BeyondCache(List<Result> results, ConsoleProgress<int> progress, int n, BitplaneBackend backend, CpuBitplaneBackend int8, KernelThreadPool pool, int threads)
    {
        const int Rows = 4096, Cols = 11008;
        var x = RandomFloats(Cols, 5);
        var y = new float[Rows];
        var matrices = Enumerable.Range(0, n).Select(i => RandomMatrix(Rows, Cols, 3, 8, 10 + i)).ToArray();
        for (int b = 3; b <= 8; b++)
        {
            var ls = matrices.Select(m => (IBenchmarkLinear)new BitplaneBenchmarkLinear(m, b, backend)).ToArray();
            Add(results, progress, new Result("bitplane", Rows, Cols, 1, b, Median(ls, x, 1, y), n));
            Add(results, progress, new Result("bitplane-int8", Rows, Cols, 1, b, Median(matrices.Select(m => (IBenchmarkLinear)new BitplaneBenchmarkLinear(m, b, int8)).ToArray(), x, 1, y), n));
        }
        matrices = null;
        GC.Collect();
        // One session holding all the layers: separate sessions would each bring a spinning thread pool.
        using (var nbits = new MatMulNBitsLinear(Rows, Cols, 4, threads, 20, layers: n))
            Add(results, progress, new Result("matmulnbits4-acc4", Rows, Cols, 1, 4, Median(nbits, x, 1, y), n));
        GC.Collect();
        var dense = Enumerable.Range(0, n).Select(i => (IBenchmarkLinear)new DenseLinear(RandomFloats((long)Rows * Cols, 30 + i), Rows, Cols, pool)).ToArray();
        Add(results, progress, new Result("dense-fp32", Rows, Cols, 1, null, Median(dense, x, 1, y), n));
    }

    private static void Add(List<Result> results, ConsoleProgress<int> progress, Result r)
    {
        results.Add(r);
        progress.Report(results.Count);
        progress.Line($"  {r.kernel,-18} {r.rows}x{r.cols} M={r.m,-2} b={r.bits?.ToString() ?? "-"}{(r.layers is int l ? $" x{l} layers" : "")}: {r.ms:F3} ms");
    }

    private static double Median(IBenchmarkLinear linear, float[] x, int m, float[] y) => Median([linear], x, m, y);

    /// <summary>Median wall time of one pass over <paramref name="linears"/>.</summary>
    private static double Median(IBenchmarkLinear[] linears, float[] x, int m, float[] y) =>
        BenchTiming.MedianMs(() => { foreach (var l in linears) l.Multiply(x, m, y); });

    internal static float[] RandomFloats(long n, int seed)
    {
        var a = new float[n];
        ulong s = (ulong)seed * 0x9E3779B97F4A7C15 | 1;
        for (long i = 0; i < n; i++) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; a[i] = ((s >> 40) / (float)(1 << 24) - 0.5f) * 0.1f; }
        return a;
    }

    /// <summary>Random planes and sorted random tables: speed does not depend on the values.</summary>
    internal static BitplaneMatrix RandomMatrix(int rows, int cols, int seedBits, int parentBits, int seed)
    {
        int words = (cols + 31) / 32;
        var planes = new uint[(long)parentBits * rows * words];
        ulong s = (ulong)seed * 0x9E3779B97F4A7C15 | 1;
        for (long i = 0; i < planes.Length; i++) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; planes[i] = (uint)(s >> 32); }
        if (cols % 32 != 0) // padding bits past cols stay zero, as the format requires
            for (int p = 0; p < parentBits; p++) for (int r = 0; r < rows; r++) planes[((long)p * rows + r) * words + words - 1] &= (1u << (cols % 32)) - 1;
        var tables = Enumerable.Range(seedBits, parentBits - seedBits + 1).Select(b =>
        {
            var t = new Half[rows << b];
            for (int i = 0; i < t.Length; i++) t[i] = (Half)(((i & ((1 << b) - 1)) - (1 << (b - 1))) * 0.01f);
            return t;
        }).ToArray();
        return BitplaneMatrix.Create("random", rows, cols, seedBits, parentBits, planes, tables);
    }
}
