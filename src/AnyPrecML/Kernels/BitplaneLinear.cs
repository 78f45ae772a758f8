using System.Runtime.CompilerServices;
using AnyPrecML.Quantization;

namespace AnyPrecML.Kernels;

/// <summary>
/// Where bitplane products run: the CPU SIMD kernels, or ILGPU on a CUDA GPU. Chosen once per process
/// by <see cref="Default"/>; free of ONNX Runtime and ML.NET types so every engine can use it.
/// </summary>
public abstract class BitplaneBackend
{
    private static readonly Lazy<BitplaneBackend> LazyDefault = new(() => (BitplaneBackend?)IlgpuBitplaneBackend.TryCreateCuda() ?? new CpuBitplaneBackend());

    /// <summary>CUDA through ILGPU when a CUDA device is present, else the widest CPU path with one thread per core.</summary>
    public static BitplaneBackend Default => LazyDefault.Value;

    /// <summary>What runs the products, in words (for logs and benchmark tables).</summary>
    public abstract string Name { get; }

    /// <summary>y[t, r] = Σ_j W_b[r, j] · x[t, j]; x is [tokens, cols], y is [tokens, rows].</summary>
    public abstract void Multiply(BitplaneMatrix weight, int bits, ReadOnlySpan<float> x, int tokens, Span<float> y);

    /// <summary>
    /// Several matrices over the same x (q/k/v, or gate/up), matrix i at width <paramref name="bits"/>[i]: y[t] is
    /// W_0·x_t, W_1·x_t, … concatenated, so y is [tokens, Σ rows]. Here one product after another; the CPU backend's
    /// int8 level quantizes x once and runs every row of every matrix in one pass of its pool, whatever their widths.
    /// </summary>
    public virtual void Multiply(IReadOnlyList<BitplaneMatrix> weights, ReadOnlySpan<int> bits, ReadOnlySpan<float> x, int tokens, Span<float> y)
    {
        int total = CheckAll(weights, bits, x, tokens, y);
        if (weights.Count == 1) { Multiply(weights[0], bits[0], x, tokens, y); return; }
        int offset = 0;
        for (int i = 0; i < weights.Count; i++)
        {
            var w = weights[i];
            int n = tokens * w.Rows;
            float[] part = System.Buffers.ArrayPool<float>.Shared.Rent(n);
            try
            {
                Multiply(w, bits[i], x, tokens, part.AsSpan(0, n));
                Interleave(part.AsSpan(0, n), tokens, w.Rows, y, total, offset);
            }
            finally { System.Buffers.ArrayPool<float>.Shared.Return(part); }
            offset += w.Rows;
        }
    }

    /// <summary>One matrix's [tokens, rows] outputs into its columns [offset, offset + rows) of y's [tokens, total].</summary>
    protected static void Interleave(ReadOnlySpan<float> part, int tokens, int rows, Span<float> y, int total, int offset)
    {
        for (int t = 0; t < tokens; t++) part.Slice(t * rows, rows).CopyTo(y.Slice(t * total + offset, rows));
    }

    /// <summary>Throws unless the matrices share their columns, each width fits its matrix, and the shapes fit; returns Σ rows.</summary>
    protected static int CheckAll(IReadOnlyList<BitplaneMatrix> weights, ReadOnlySpan<int> bits, ReadOnlySpan<float> x, int tokens, Span<float> y)
    {
        ArgumentNullException.ThrowIfNull(weights);
        if (weights.Count == 0) throw new ArgumentException("no matrices to multiply.", nameof(weights));
        if (bits.Length != weights.Count) throw new ArgumentException($"{bits.Length} widths for {weights.Count} matrices.", nameof(bits));
        int total = 0;
        for (int i = 0; i < weights.Count; i++)
        {
            var w = weights[i];
            w.CheckBits(bits[i]);
            if (w.Cols != weights[0].Cols) throw new ArgumentException($"{w.Name} has {w.Cols} columns, {weights[0].Name} {weights[0].Cols}: fused matrices share x.", nameof(weights));
            total += w.Rows;
        }
        ArgumentOutOfRangeException.ThrowIfLessThan(tokens, 1);
        if (x.Length != (long)tokens * weights[0].Cols) throw new ArgumentException($"x holds {x.Length} floats; {tokens} tokens × {weights[0].Cols} columns expected.", nameof(x));
        if (y.Length != (long)tokens * total) throw new ArgumentException($"y holds {y.Length} floats; {tokens} tokens × {total} rows expected.", nameof(y));
        return total;
    }

    /// <summary>Throws unless the shapes fit.</summary>
    protected static void Check(BitplaneMatrix weight, int bits, ReadOnlySpan<float> x, int tokens, Span<float> y)
    {
        weight.CheckBits(bits);
        ArgumentOutOfRangeException.ThrowIfLessThan(tokens, 1);
        if (x.Length != (long)tokens * weight.Cols) throw new ArgumentException($"x holds {x.Length} floats; {tokens} tokens × {weight.Cols} columns expected.", nameof(x));
        if (y.Length != (long)tokens * weight.Rows) throw new ArgumentException($"y holds {y.Length} floats; {tokens} tokens × {weight.Rows} rows expected.", nameof(y));
    }
}

/// <summary>The CPU kernels (<see cref="BitplaneKernels"/>) over rows split among a <see cref="KernelThreadPool"/>.</summary>
public sealed unsafe class CpuBitplaneBackend : BitplaneBackend
{
    [ThreadStatic] private static RowsJob? t_job;
    private readonly KernelThreadPool _pool;

    /// <summary>
    /// A backend on <paramref name="path"/> (default: the widest supported), <paramref name="pool"/> (default: the
    /// shared one) and <paramref name="accuracy"/> (default int8: see <see cref="KernelAccuracy.Int8"/>).
    /// </summary>
    public CpuBitplaneBackend(KernelPath? path = null, KernelThreadPool? pool = null, KernelAccuracy accuracy = KernelAccuracy.Int8)
    {
        Path = path ?? BitplaneKernels.Best;
        if (!BitplaneKernels.IsSupported(Path)) throw new PlatformNotSupportedException($"the {Path} kernels need instructions this CPU lacks.");
        _pool = pool ?? KernelThreadPool.Shared;
        Accuracy = accuracy;
        // The 512-bit int8 kernels need GFNI and VBMI; without them the AVX2 int8 kernels run (never a silent fp32).
        _int8Path = BitplaneKernels.SupportsInt8(Path) ? Path : KernelPath.Vector256;
    }

    private readonly KernelPath _int8Path;

    /// <summary>The instruction path used.</summary>
    public KernelPath Path { get; }

    /// <summary>The threads the products run on (the CPU attention runs on them too).</summary>
    internal KernelThreadPool Pool => _pool;

    /// <summary>The arithmetic in effect.</summary>
    public KernelAccuracy Accuracy { get; }

    /// <summary>The path that actually runs the products: <see cref="Path"/>, or AVX2 for int8 on AVX-512 without GFNI/VBMI.</summary>
    public KernelPath RunningPath => Accuracy == KernelAccuracy.Int8 ? _int8Path : Path;

    /// <inheritdoc/>
    public override string Name
    {
        get
        {
            var path = RunningPath;
            string isa = path switch
            {
                KernelPath.Vector512 when Accuracy == KernelAccuracy.Int8 => "AVX-512 VBMI + GFNI",
                KernelPath.Vector512 => BitplaneKernels.UsesGfni ? "AVX-512 + GFNI" : "AVX-512",
                KernelPath.Vector256 => "AVX2",
                KernelPath.Vector128 => "128-bit",
                _ => "scalar",
            };
            string vnni = Accuracy == KernelAccuracy.Int8 && path != KernelPath.Vector128 && path != KernelPath.Scalar && BitplaneKernels.UsesVnni ? " + VNNI" : "";
            string note = Accuracy == KernelAccuracy.Int8 && BitplaneKernels.FewTokensNote is { } n ? $", {n}" : "";
            return $"CPU {path} ({isa}{vnni}) {(Accuracy == KernelAccuracy.Int8 ? "int8" : "fp32")}, {_pool.Threads} threads{note}";
        }
    }

    /// <inheritdoc/>
    public override void Multiply(BitplaneMatrix weight, int bits, ReadOnlySpan<float> x, int tokens, Span<float> y)
    {
        Check(weight, bits, x, tokens, y);
        var job = t_job ??= new RowsJob();
        if (Accuracy == KernelAccuracy.Int8)
        {
            job.One[0] = weight;
            MultiplyInt8(job, job.One, weight.Rows, [bits], x, tokens, y);
            return;
        }
        if (BitplaneKernels.PermutesColumns(Path))
        {
            // The GFNI decoder yields codes in a fixed order inside each block: permute x once to match.
            if (job.Permuted.Length < x.Length) job.Permuted = GC.AllocateArray<float>(x.Length, pinned: true);
            for (int t = 0; t < tokens; t++)
                BitplaneKernels.PermuteColumns(x.Slice(t * weight.Cols, weight.Cols), job.Permuted.AsSpan(t * weight.Cols, weight.Cols), weight.Cols);
            x = job.Permuted.AsSpan(0, x.Length);
        }
        fixed (float* xp = x, yp = y)
        {
            job.Operand = new BitplaneOperand(weight, bits);
            job.Path = Path; job.X = xp; job.Y = yp; job.Tokens = tokens;
            _pool.Run(job, weight.Rows, Chunk(weight.Rows, weight.Cols, bits, tokens));
            job.X = job.Y = null;
        }
    }

    /// <inheritdoc/>
    public override void Multiply(IReadOnlyList<BitplaneMatrix> weights, ReadOnlySpan<int> bits, ReadOnlySpan<float> x, int tokens, Span<float> y)
    {
        int total = CheckAll(weights, bits, x, tokens, y);
        // fp32: one pass per matrix (the 512-bit GFNI kernels permute x per width). Int8: x's column order and stride
        // depend on the path alone, so the matrices of a precision profile, at different widths, still share one pass.
        if (Accuracy != KernelAccuracy.Int8 || weights.Count == 1) { base.Multiply(weights, bits, x, tokens, y); return; }
        MultiplyInt8(t_job ??= new RowsJob(), weights, total, bits, x, tokens, y);
    }

    /// <summary>
    /// The int8 products of one or more matrices over the same x, matrix i at width <paramref name="bits"/>[i]: x
    /// quantized once, then every row of every matrix in one pass of the pool. One token's outputs are concatenated as
    /// they come; several tokens' go through a buffer (each matrix's own [tokens, rows]) and are interleaved into y after.
    /// </summary>
    private void MultiplyInt8(RowsJob job, IReadOnlyList<BitplaneMatrix> weights, int totalRows, ReadOnlySpan<int> bits, ReadOnlySpan<float> x, int tokens, Span<float> y)
    {
        var weight = weights[0];
        int cols = weight.Cols;
        var path = _int8Path;
        var order = BitplaneKernels.Int8Order(path);
        int stride = BitplaneKernels.Int8TokenStride(path, cols);
        job.EnsureInt8(tokens, stride);
        // |x| feeds the unsigned side of vpmaddubsw/vpdpbusd where the tables are signed (AVX2 and AVX-512 without
        // VNNI); the sign mask only the 512-bit path then (AVX-512 has no vpsignb). Offset tables and the 128-bit and
        // scalar paths multiply x8 directly.
        bool signed = path is KernelPath.Vector512 or KernelPath.Vector256 && !BitplaneKernels.OffsetTables;
        bool abs = signed, sign = signed && path == KernelPath.Vector512;
        for (int t = 0; t < tokens; t++)
            (job.XScale[t], job.XSum[t]) = BitplaneKernels.QuantizeActivations(x.Slice(t * cols, cols), job.X8.AsSpan(t * stride, stride),
                abs ? job.XAbs.AsSpan(t * stride, stride) : default, sign ? job.XSign.AsSpan(t * stride, stride) : default, order);
        bool split = tokens > 1 && weights.Count > 1;
        if (split && job.Split.Length < (long)tokens * totalRows) job.Split = GC.AllocateArray<float>(tokens * totalRows, pinned: true);
        fixed (float* yp = y, sp = job.Split)
        {
            if (job.Parts.Length < weights.Count) job.Parts = new RowsJob.Part[weights.Count];
            int offset = 0, widest = 0;
            for (int i = 0; i < weights.Count; i++)
            {
                var w = weights[i];
                job.Parts[job.PartCount++] = new RowsJob.Part(new BitplaneOperand(w, bits[i]), BitplaneKernels.Int8TablesOf(w, bits[i]), offset,
                    split ? sp + (long)tokens * offset : yp + offset);
                offset += w.Rows;
                widest = Math.Max(widest, bits[i]);
            }
            job.Path = path; job.Tokens = tokens; job.Int8 = true; job.X8Stride = stride;
            try { _pool.Run(job, totalRows, Chunk(totalRows, cols, widest, tokens)); }
            finally
            {
                Array.Clear(job.Parts, 0, job.PartCount);
                job.PartCount = 0; job.Int8 = false;
            }
        }
        if (split)
        {
            int offset = 0;
            foreach (var w in weights)
            {
                Interleave(job.Split.AsSpan(tokens * offset, tokens * w.Rows), tokens, w.Rows, y, totalRows, offset);
                offset += w.Rows;
            }
        }
    }

    /// <summary>
    /// y[t, r] = Σ_j W[r, j]·x[t, j] for a dense int8 matrix (the LM head): each token's activations to int8 as for the
    /// bitplane int8 kernels, exact integer products, one rescale per output (y = s_x·Scale[r]·Σ Q·x8). Every token
    /// is quantized on its own, so a row of several tokens gives each token the bits it gets alone (speculative
    /// verification stays exact). Runs at the int8 level whatever <see cref="Accuracy"/> says: the matrix is int8.
    /// </summary>
    public void Multiply(Int8Matrix weight, ReadOnlySpan<float> x, int tokens, Span<float> y)
    {
        ArgumentNullException.ThrowIfNull(weight);
        ArgumentOutOfRangeException.ThrowIfLessThan(tokens, 1);
        if (x.Length != (long)tokens * weight.Cols) throw new ArgumentException($"x holds {x.Length} floats; {tokens} tokens × {weight.Cols} columns expected.", nameof(x));
        if (y.Length != (long)tokens * weight.Rows) throw new ArgumentException($"y holds {y.Length} floats; {tokens} tokens × {weight.Rows} rows expected.", nameof(y));
        var job = t_job ??= new RowsJob();
        int cols = weight.Cols, stride = weight.Stride;
        job.EnsureInt8(tokens, stride);
        bool abs = Path != KernelPath.Scalar && Path != KernelPath.Vector128;
        for (int t = 0; t < tokens; t++)
            (job.XScale[t], job.XSum[t]) = BitplaneKernels.QuantizeActivations(x.Slice(t * cols, cols), job.X8.AsSpan(t * stride, cols),
                abs ? job.XAbs.AsSpan(t * stride, cols) : default, default, Int8ColumnOrder.Natural);
        fixed (float* yp = y)
        {
            job.Dense = weight; job.Path = Path; job.Y = yp; job.Tokens = tokens;
            _pool.Run(job, weight.Rows, (long)weight.Rows * weight.Cols * tokens < 1 << 15 ? weight.Rows : Math.Max(16, weight.Rows / (_pool.Threads * 8)));
            job.Y = null; job.Dense = null;
        }
    }

    /// <summary>
    /// Rows per chunk: about eight chunks per thread, or every row on the calling thread when the whole call is too
    /// small to pay for waking the pool (a stories260K layer at 3 bits). Each row costs its weights times tokens
    /// plus its table of 2^b centroids, which dominates small rows at high b.
    /// </summary>
    private int Chunk(int rows, int cols, int bits, int tokens) =>
        (long)rows * ((long)cols * tokens + (8L << bits)) < 1 << 15 ? rows : Math.Max(4, rows / (_pool.Threads * 8));

    /// <summary>One call's arguments, reused by the calling thread (no allocation per call).</summary>
    private sealed class RowsJob : IRangeJob
    {
        /// <summary>One matrix of an int8 call: its operand and tables, its first row among all, where its outputs go.</summary>
        public readonly struct Part(BitplaneOperand operand, BitplaneKernels.Int8Tables tables, int offset, float* y)
        {
            public readonly BitplaneOperand Operand = operand;
            public readonly BitplaneKernels.Int8Tables Tables = tables;
            public readonly int Offset = offset;
            public readonly float* Y = y;
        }

        public bool Int8;
        public Part[] Parts = [];
        public int PartCount;
        public readonly BitplaneMatrix[] One = new BitplaneMatrix[1];
        public float[] Split = [];
        public sbyte[] X8 = [], XSign = [];
        public byte[] XAbs = [];
        public float[] XScale = [];
        public int[] XSum = [];
        public int X8Stride;
        [ThreadStatic] private static byte[]? t_scratch8;
        [ThreadStatic] private static float[]? t_scratch;
        public BitplaneOperand Operand;
        public KernelPath Path;
        public float[] Permuted = [];
        public float* X, Y;
        public int Tokens;

        public Int8Matrix? Dense;

        /// <summary>Room for <paramref name="tokens"/> tokens of int8 activations <paramref name="stride"/> bytes apart.</summary>
        public void EnsureInt8(int tokens, int stride)
        {
            if (X8.Length < (long)tokens * stride + 64)
            {
                // + 64: whole-register loads past the last partial word stay inside this array. Bytes between a token's
                // columns and its stride may hold an earlier call's values: in natural order they meet Int8Matrix's
                // zero padding; the Slice256 quantizer writes its padding as zeros itself.
                X8 = GC.AllocateArray<sbyte>(tokens * stride + 64, pinned: true);
                XAbs = GC.AllocateArray<byte>(tokens * stride + 64, pinned: true);
                XSign = GC.AllocateArray<sbyte>(tokens * stride + 64, pinned: true);
            }
            if (XScale.Length < tokens) { XScale = GC.AllocateArray<float>(tokens, pinned: true); XSum = GC.AllocateArray<int>(tokens, pinned: true); }
        }

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Execute(int start, int end)
        {
            if (Dense is { } dense)
            {
                fixed (sbyte* q = dense.Values, x8 = X8)
                fixed (byte* xAbs = XAbs)
                    BitplaneKernels.RowsDenseInt8(Path, dense, q, x8, xAbs, Tokens, Y, start, end);
                for (int t = 0; t < Tokens; t++)
                    for (int r = start; r < end; r++)
                    {
                        ref float o = ref Y[(long)t * dense.Rows + r];
                        o = XScale[t] * dense.Scale[r] * o;
                    }
                return;
            }
            if (Int8)
            {
                int bytes = BitplaneKernels.Int8ScratchBytes(Parts[0].Operand.Cols);
                if (t_scratch8 is null || t_scratch8.Length < bytes) t_scratch8 = GC.AllocateArray<byte>(bytes, pinned: true);
                fixed (sbyte* x8 = X8, xSign = XSign)
                fixed (byte* xAbs = XAbs)
                fixed (float* scale = XScale)
                fixed (int* sum = XSum)
                fixed (byte* scratch = t_scratch8)
                    for (int i = 0; i < PartCount; i++)
                    {
                        // A chunk may straddle two matrices: each gets its own rows of it.
                        ref readonly var p = ref Parts[i];
                        int from = Math.Max(start, p.Offset), to = Math.Min(end, p.Offset + p.Operand.Rows);
                        if (from < to)
                            BitplaneKernels.RowsInt8(Path, p.Operand, p.Tables, x8, xAbs, xSign, X8Stride, scale, sum, Tokens, p.Y, from - p.Offset, to - p.Offset, scratch);
                    }
                return;
            }
            int need = BitplaneKernels.ScratchFloats(Operand.Cols);
            if (t_scratch is null || t_scratch.Length < need) t_scratch = GC.AllocateArray<float>(need, pinned: true);
            fixed (float* scratch = t_scratch) BitplaneKernels.Rows(Path, Operand, X, Tokens, Y, start, end, scratch);
        }
    }
}
