using System.CommandLine;
using AnyPrecML.Generation;
using AnyPrecML.Kernels;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using AnyPrecML.Tokenization;
using ILGPU;
using ILGPU.Runtime;
using ILGPU.Runtime.CPU;
using ILGPU.Runtime.Cuda;

namespace AnyPrecML.Cli;

/// <summary>
/// `anyprec bench gpu`: the ILGPU bitplane kernel checked and timed on one accelerator: correctness against a float64
/// reference at every b and M, greedy generation equal to the CPU's, and GEMV speed as a fraction of the device's
/// measured copy bandwidth. Exits 1 on any mismatch, so scripts/gpu-check.sh can gate on it.
/// </summary>
internal static class BenchGpuCommand
{
    private sealed record KernelCheck(int bits, int m, double worst_relative_error, bool pass);
    private sealed record GenerationCheck(int bits, int tokens, bool match, string text, string cpu_text);
    private sealed record Gemv(int rows, int cols, int bits, double ms, double gb_per_s, double fraction_of_bandwidth);

    // The kernel is held to the CPU kernels' bound: error relative to Σ|w·x|, the scale of fp32 rounding in a dot product.
    private const double Tolerance = 1e-5;

    public static Command Create()
    {
        var accelerator = new Option<string>("--accelerator")
        {
            Description = "cuda (the first NVIDIA GPU; an error when there is none) or cpu (ILGPU's CPU accelerator: correct, but its speed means nothing).",
            DefaultValueFactory = _ => "cuda",
        }.AcceptOnlyFromAmong("cuda", "cpu");
        var quick = new Option<bool>("--quick") { Description = "Small GEMV shapes, a small copy and short generation (seconds on the CPU accelerator)." };
        var model = new Option<string>("--model", "-m")
        {
            Description = "Model for the generation check: an any-precision directory, or a llama2.c .bin quantized to a temporary directory (uniform sensitivity).",
            DefaultValueFactory = _ => Path.Combine("..", "shared", "models", "stories260K", "stories260K.bin"),
        };
        var json = CommonOptions.Json();
        var command = new Command("gpu", "The ILGPU bitplane kernel on one accelerator: float64 check at b = 2..8 and M = 1, 4, 8, 64, greedy text equal to the CPU's, GEMV at b = 3..8 against measured bandwidth.")
        {
            accelerator, quick, model, json,
        };
        command.SetAction((r, ct) =>
        {
            bool cuda = r.GetValue(accelerator) == "cuda", isQuick = r.GetValue(quick);
            using var backend = cuda
                ? IlgpuBitplaneBackend.TryCreateCuda() ?? throw new InvalidOperationException("no CUDA device: ILGPU found no CUDA accelerator (no NVIDIA GPU or driver on this machine; --accelerator cpu runs the check on the CPU)")
                : IlgpuBitplaneBackend.CreateCpu();
            var err = r.Err();
            err.WriteLine($"accelerator: {backend.Name}");
            (int Rows, int Cols)[] shapes = isQuick ? [(64, 256), (64, 688), (172, 256)] : [(4096, 4096), (4096, 11008), (11008, 4096)];
            // Steps: 7 widths x 4 M kernel checks, 2 generation checks, 6 widths per GEMV shape.
            var progress = new ConsoleProgress<int>(err, "bench gpu", done => (done, 7 * 4 + 2 + 6 * shapes.Length), "steps");
            int steps = 0;
            void Step(string line) { progress.Report(++steps); progress.Line(line); }

            var checks = CheckKernel(backend, Step);
            var generation = CheckGeneration(backend, r.GetValue(model)!, cuda, isQuick ? 8 : 80, Step, line => progress.Line(line), ct);
            double bandwidth = CopyBandwidth(cuda, (isQuick ? 1L : 512L) << 20);
            progress.Line($"  copy bandwidth: {bandwidth:G3} GB/s");
            var gemv = Benchmark(backend, shapes, bandwidth, Step);
            bool passed = checks.All(c => c.pass) && generation.All(g => g.match);

            if (r.GetValue(json)) r.WriteJson(new { accelerator = backend.Name, passed, checks, generation, bandwidth_gb_per_s = bandwidth, gemv });
            else
            {
                var o = r.Out();
                o.WriteLine($"`anyprec bench gpu` on {backend.Name}\n\n| check | shape | b | M | result |\n|---|---|---:|---:|---|");
                foreach (var c in checks) o.WriteLine($"| kernel vs float64 | {CheckRows}×{CheckCols} | {c.bits} | {c.m} | {(c.pass ? "PASS" : "FAIL")} (worst relative error {c.worst_relative_error:E1}) |");
                foreach (var g in generation) o.WriteLine($"| greedy generation vs CPU fp32 | model | {g.bits} | 1 | {(g.match ? "PASS" : "FAIL")} ({g.tokens} tokens{(g.match ? ", same text" : $": \"{g.text}\" vs \"{g.cpu_text}\"")}) |");
                o.WriteLine($"| copy bandwidth | {(isQuick ? 1 : 512)} MiB | - | - | {bandwidth:G3} GB/s |");
                foreach (var s in gemv) o.WriteLine($"| GEMV | {s.rows}×{s.cols} | {s.bits} | 1 | {s.ms:F3} ms, {s.gb_per_s:G3} GB/s, {s.fraction_of_bandwidth:P0} of copy bandwidth |");
            }
            if (!passed) err.WriteLine($"error: {checks.Count(c => !c.pass)} kernel checks and {generation.Count(g => !g.match)} generation checks failed (the FAIL rows; {backend.Name})");
            return Task.FromResult(passed ? 0 : 1);
        });
        return command;
    }

    // Columns not a multiple of 32, so the last plane word's padding is exercised.
    private const int CheckRows = 40, CheckCols = 1000;

    /// <summary>y = W_b·x on the accelerator against a float64 dequantize-then-multiply, b = 2..8, M = 1, 4, 8, 64.</summary>
    private static List<KernelCheck> CheckKernel(IlgpuBitplaneBackend backend, Action<string> step)
    {
        var matrix = QuantizedMatrix(CheckRows, CheckCols);
        var results = new List<KernelCheck>();
        for (int bits = matrix.SeedBits; bits <= matrix.ParentBits; bits++)
        {
            var w = matrix.Dequantize(bits);
            foreach (int m in new[] { 1, 4, 8, 64 })
            {
                var x = BenchKernelsCommand.RandomFloats((long)m * CheckCols, 7 * m + bits);
                var y = new float[m * CheckRows];
                backend.Multiply(matrix, bits, x, m, y);
                double worst = 0;
                for (int t = 0; t < m; t++)
                    for (int row = 0; row < CheckRows; row++)
                    {
                        double sum = 0, abs = 0;
                        for (int j = 0; j < CheckCols; j++)
                        {
                            double p = (double)w[(long)row * CheckCols + j] * x[t * CheckCols + j];
                            sum += p; abs += Math.Abs(p);
                        }
                        double e = Math.Abs(y[t * CheckRows + row] - sum) / Math.Max(abs, 1e-30);
                        worst = double.IsNaN(e) ? double.PositiveInfinity : Math.Max(worst, e);
                    }
                var c = new KernelCheck(bits, m, worst, worst < Tolerance);
                results.Add(c);
                step($"  kernel b={bits} M={m,-2}: {(c.pass ? "PASS" : "FAIL")} worst relative error {worst:E2}");
            }
        }
        return results;
    }

    /// <summary>A quantized (not random) matrix, seed 2 and parent 8: real tables, so every width's codes mean something.</summary>
    private static BitplaneMatrix QuantizedMatrix(int rows, int cols)
    {
        var rng = new Random(19);
        var ones = Enumerable.Repeat(1f, cols).ToArray();
        var q = new RowQuantization[rows];
        var v = new float[cols];
        for (int r = 0; r < rows; r++)
        {
            for (int j = 0; j < cols; j++) v[j] = (float)(Math.Sqrt(-2 * Math.Log(1 - rng.NextDouble())) * Math.Cos(2 * Math.PI * rng.NextDouble()));
            q[r] = RowQuantizer.Quantize(v, ones, 2, 8, (ulong)r);
        }
        return BitplaneMatrix.FromRows("gpu-check", q, cols);
    }

    /// <summary>Greedy text with the bitplane products on the accelerator against the same engine on the CPU fp32 kernels, at the seed and parent widths.</summary>
    private static List<GenerationCheck> CheckGeneration(IlgpuBitplaneBackend backend, string modelPath, bool cuda, int tokens, Action<string> step, Action<string> note, CancellationToken ct)
    {
        string? temp = null;
        try
        {
            if (!Directory.Exists(modelPath))
            {
                temp = Directory.CreateTempSubdirectory("anyprec-gpu-check-").FullName;
                using var source = LlamaCheckpoint.Open(modelPath);
                AnyPrecisionQuantizer.Quantize(source, Path.Combine(temp, "model"), new UniformSensitivity(), new QuantizerOptions(), cancellationToken: ct);
                modelPath = Path.Combine(temp, "model");
            }
            using var model = AnyPrecisionModel.Open(modelPath);
            var tokenizer = LlamaTokenizerLoader.Load(model.Checkpoint);
            using var device = new OnnxEngine(model, new OnnxEngineOptions { Backend = backend, Device = cuda ? OnnxDevice.Auto : OnnxDevice.Cpu });
            // The reference keeps what CUDA's GroupQueryAttention keeps, an fp32 cache: greedy texts are compared exactly.
            using var cpu = new OnnxEngine(model, new OnnxEngineOptions { Backend = new CpuBitplaneBackend(accuracy: KernelAccuracy.Float32), Device = OnnxDevice.Cpu, KvCacheType = KvCacheType.Float32 });
            note($"  generation: ONNX Runtime on {device.ExecutionProvider}, bitplane products on {backend.Name}");
            var options = new GenerationOptions { MaxTokens = tokens, Temperature = 0 };
            var results = new List<GenerationCheck>();
            foreach (int bits in new[] { model.SeedBits, model.ParentBits })
            {
                device.Bits = cpu.Bits = bits;
                var text = new TextGenerator(device, tokenizer).Generate("Once upon a time", options, ct);
                string expected = new TextGenerator(cpu, tokenizer).Generate("Once upon a time", options, ct).Text;
                results.Add(new GenerationCheck(bits, text.Tokens, text.Text == expected, text.Text, expected));
                step($"  generation b={bits}: {(text.Text == expected ? "PASS" : "FAIL")} ({text.Tokens} tokens)");
            }
            return results;
        }
        finally
        {
            if (temp is not null) Directory.Delete(temp, recursive: true);
        }
    }

    /// <summary>Median GEMV (M = 1) time at b = 3..8; the bytes counted are the b planes (padded words) and the b-bit fp32 table, as the kernel reads them.</summary>
    private static List<Gemv> Benchmark(IlgpuBitplaneBackend backend, (int Rows, int Cols)[] shapes, double bandwidth, Action<string> step)
    {
        var results = new List<Gemv>();
        foreach (var (rows, cols) in shapes)
        {
            var matrix = BenchKernelsCommand.RandomMatrix(rows, cols, 3, 8, 1);
            var x = BenchKernelsCommand.RandomFloats(cols, 3);
            var y = new float[rows];
            for (int bits = 3; bits <= 8; bits++)
            {
                double ms = BenchTiming.MedianMs(() => backend.Multiply(matrix, bits, x, 1, y));
                double bytes = (double)rows * matrix.WordsPerRow * 4 * bits + (double)rows * (1 << bits) * 4;
                double gbs = bytes / (ms * 1e6);
                var g = new Gemv(rows, cols, bits, Math.Round(ms, 4), gbs, gbs / bandwidth);
                results.Add(g);
                step($"  gemv {rows}x{cols} b={bits}: {ms:F3} ms, {gbs:G3} GB/s");
            }
        }
        return results;
    }

    /// <summary>Device memory bandwidth in GB/s from a plain copy kernel (bytes read plus bytes written per second), median of many runs.</summary>
    private static double CopyBandwidth(bool cuda, long bytes)
    {
        using var context = Context.Create(b => { if (cuda) b.Cuda(); else b.CPU(); });
        using var accelerator = cuda ? context.GetCudaDevices()[0].CreateAccelerator(context) : context.CreateCPUAccelerator(0);
        long n = bytes / sizeof(float);
        using var source = accelerator.Allocate1D<float>(n);
        using var target = accelerator.Allocate1D<float>(n);
        source.MemSetToZero();
        var copy = accelerator.LoadAutoGroupedStreamKernel<Index1D, ArrayView<float>, ArrayView<float>>(Copy);
        double ms = BenchTiming.MedianMs(() => { copy((int)n, source.View, target.View); accelerator.Synchronize(); });
        return 2.0 * bytes / (ms * 1e6);
    }

    private static void Copy(Index1D i, ArrayView<float> source, ArrayView<float> target) => target[i] = source[i];
}
