using System.Numerics.Tensors;
using AnyPrecML.Kernels;
using AnyPrecML.Models;

namespace AnyPrecML.Reference;

/// <summary>
/// The fp32 forward pass of the Llama architecture, written to be read in one sitting and trusted:
/// every later engine is checked against it. RMSNorm → attention (RoPE, grouped-query, KV cache) →
/// residual → RMSNorm → SwiGLU → residual, per block; then the final norm and the output head.
/// Vector work goes through TensorPrimitives; matrix products are parallel over output rows.
/// </summary>
public sealed class ReferenceEngine : IInferenceEngine
{
    private readonly LlamaWeights _w;

    /// <summary>An engine over fp32 <paramref name="weights"/> (kept by reference, not copied).</summary>
    public ReferenceEngine(LlamaWeights weights) => _w = weights ?? throw new ArgumentNullException(nameof(weights));

    /// <summary>Loads every tensor of <paramref name="checkpoint"/> as fp32 and builds an engine over them.</summary>
    public static ReferenceEngine FromCheckpoint(LlamaCheckpoint checkpoint) => new(LlamaWeights.FromCheckpoint(checkpoint));

    /// <inheritdoc/>
    public LlamaConfig Config => _w.Config;

    /// <summary>
    /// Receives the input of every block linear layer as it runs (calibration: activation statistics
    /// for the Hessian sensitivity, activations kept for the Fisher backward pass). Null: no calls.
    /// </summary>
    public ILinearInputObserver? Observer { get; set; }

    /// <summary>The weights the engine runs.</summary>
    public LlamaWeights Weights => _w;

    /// <inheritdoc/>
    public KvCache CreateCache(int capacity = 0)
    {
        if (capacity > Config.MaxSeqLen) throw new ArgumentOutOfRangeException(nameof(capacity), $"capacity {capacity} exceeds the model's context of {Config.MaxSeqLen}.");
        return new ReferenceKvCache(Config, capacity <= 0 ? Config.MaxSeqLen : capacity);
    }

    /// <inheritdoc/>
    public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits)
    {
        var c = Config;
        int n = tokens.Length, dim = c.Dim, hd = c.HeadDim, vocab = c.VocabSize;
        if (cache is not ReferenceKvCache kv || kv.Owner != c) throw new ArgumentException("the cache was not created by this engine.", nameof(cache));
        bool allLogits = ForwardArguments.Check(c, tokens, cache, logits);
        int pos0 = kv.Length;

        var x = new float[n * dim];
        for (int t = 0; t < n; t++)
        {
            int id = tokens[t];
            _w.Embedding.AsSpan(id * dim, dim).CopyTo(x.AsSpan(t * dim, dim));
        }
        var xb = new float[n * dim];
        var q = new float[n * c.QDim];
        var k = new float[n * c.KvDim];
        var v = new float[n * c.KvDim];
        var att = new float[n * c.QDim];
        var proj = new float[n * dim];
        var gate = new float[n * c.HiddenDim];
        var up = new float[n * c.HiddenDim];
        var (cos, sin) = RopeTables(c, pos0, n);

        for (int l = 0; l < c.Layers; l++)
        {
            var b = _w.Blocks[l];
            RmsNorm(x, b.AttentionNorm, xb, n, dim, c.RmsNormEps);
            Observe(l, xb, n, dim, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj");
            MatMul(xb, b.Wq, q, n, dim, c.QDim);
            MatMul(xb, b.Wk, k, n, dim, c.KvDim);
            MatMul(xb, b.Wv, v, n, dim, c.KvDim);
            ApplyRope(q, n, c.Heads, hd, cos, sin, c.RopeLayout);
            ApplyRope(k, n, c.KvHeads, hd, cos, sin, c.RopeLayout);
            k.CopyTo(kv.Keys[l], pos0 * c.KvDim);
            v.CopyTo(kv.Values[l], pos0 * c.KvDim);
            Attention(q, kv.Keys[l], kv.Values[l], att, n, pos0, c);
            Observe(l, att, n, c.QDim, "self_attn.o_proj");
            MatMul(att, b.Wo, proj, n, c.QDim, dim);
            TensorPrimitives.Add(x, proj, x);

            RmsNorm(x, b.FfnNorm, xb, n, dim, c.RmsNormEps);
            Observe(l, xb, n, dim, "mlp.gate_proj", "mlp.up_proj");
            MatMul(xb, b.Gate, gate, n, dim, c.HiddenDim);
            MatMul(xb, b.Up, up, n, dim, c.HiddenDim);
            SwiGlu(gate, up);
            Observe(l, gate, n, c.HiddenDim, "mlp.down_proj");
            MatMul(gate, b.Down, proj, n, c.HiddenDim, dim);
            TensorPrimitives.Add(x, proj, x);
        }
        kv.Advance(n);

        RmsNorm(x, _w.FinalNorm, xb, n, dim, c.RmsNormEps);
        if (allLogits) MatMul(xb, _w.Head, logits, n, dim, vocab);
        else MatMul(xb.AsSpan((n - 1) * dim, dim), _w.Head, logits, 1, dim, vocab);
    }

    private void Observe(int layer, float[] input, int n, int cols, params string[] parts)
    {
        if (Observer is null) return;
        foreach (var part in parts) Observer.Observe(layer, part, input.AsSpan(0, n * cols), n, cols);
    }

    /// <summary>Nothing to release: the weights are managed arrays.</summary>
    public void Dispose() { }

    /// <summary>x / sqrt(mean(x²) + eps) * weight, for each of the <paramref name="n"/> rows.</summary>
    public static void RmsNorm(ReadOnlySpan<float> x, ReadOnlySpan<float> weight, Span<float> output, int n, int dim, float eps)
    {
        for (int t = 0; t < n; t++)
        {
            var row = x.Slice(t * dim, dim);
            var o = output.Slice(t * dim, dim);
            float scale = 1f / MathF.Sqrt(TensorPrimitives.SumOfSquares(row) / dim + eps);
            TensorPrimitives.Multiply(row, scale, o);
            TensorPrimitives.Multiply(o, weight, o);
        }
    }

    /// <summary>y[t, r] = Σ_i x[t, i] · W[r, i]: <paramref name="n"/> tokens through a row-major [rows, cols] weight.</summary>
    public static void MatMul(ReadOnlySpan<float> x, float[] w, Span<float> y, int n, int cols, int rows)
    {
        // Spans cannot enter a parallel lambda; small products run inline where threads cost more than they save.
        if ((long)n * rows * cols < 1 << 16)
        {
            for (int r = 0; r < rows; r++)
            {
                var wr = w.AsSpan(r * cols, cols);
                for (int t = 0; t < n; t++) y[t * rows + r] = TensorPrimitives.Dot(x.Slice(t * cols, cols), wr);
            }
            return;
        }
        float[] xa = x.ToArray(), ya = new float[n * rows];
        const int Block = 16;
        Parallel.For(0, (rows + Block - 1) / Block, blk =>
        {
            int end = Math.Min(rows, (blk + 1) * Block);
            for (int r = blk * Block; r < end; r++)
            {
                var wr = w.AsSpan(r * cols, cols);
                for (int t = 0; t < n; t++) ya[t * rows + r] = TensorPrimitives.Dot(xa.AsSpan(t * cols, cols), wr);
            }
        });
        ya.CopyTo(y);
    }

    /// <summary>cos and sin of position × frequency for positions pos0.. and each of headDim/2 frequencies.</summary>
    internal static (float[] Cos, float[] Sin) RopeTables(LlamaConfig c, int pos0, int n)
    {
        int half = c.HeadDim / 2;
        var cos = new float[n * half];
        var sin = new float[n * half];
        for (int j = 0; j < half; j++)
        {
            float freq = 1f / MathF.Pow(c.RopeTheta, 2f * j / c.HeadDim);
            for (int t = 0; t < n; t++)
            {
                float angle = (pos0 + t) * freq;
                cos[t * half + j] = MathF.Cos(angle);
                sin[t * half + j] = MathF.Sin(angle);
            }
        }
        return (cos, sin);
    }

    /// <summary>Rotates each pair of dimensions of every head by its position's angle.</summary>
    private static void ApplyRope(float[] v, int n, int heads, int hd, float[] cos, float[] sin, RopeLayout layout)
    {
        int half = hd / 2;
        for (int t = 0; t < n; t++)
            for (int h = 0; h < heads; h++)
            {
                int baseIdx = (t * heads + h) * hd;
                for (int j = 0; j < half; j++)
                {
                    // Interleaved pairs (2j, 2j+1); half-split pairs (j, j+half).
                    int i0 = layout == RopeLayout.Interleaved ? baseIdx + 2 * j : baseIdx + j;
                    int i1 = layout == RopeLayout.Interleaved ? i0 + 1 : i0 + half;
                    float c0 = cos[t * half + j], s0 = sin[t * half + j];
                    float a = v[i0], b = v[i1];
                    v[i0] = a * c0 - b * s0;
                    v[i1] = a * s0 + b * c0;
                }
            }
    }

    /// <summary>Causal attention of <paramref name="n"/> new queries over every cached position up to their own.</summary>
    private static void Attention(float[] q, float[] keys, float[] values, float[] output, int n, int pos0, LlamaConfig c)
    {
        int hd = c.HeadDim, kvDim = c.KvDim, group = c.Heads / c.KvHeads;
        float scale = 1f / MathF.Sqrt(hd);
        void One(int item, float[] scores)
        {
            int t = item / c.Heads, h = item % c.Heads, g = h / group, len = pos0 + t + 1;
            var qh = q.AsSpan((t * c.Heads + h) * hd, hd);
            var s = scores.AsSpan(0, len);
            for (int p = 0; p < len; p++) s[p] = TensorPrimitives.Dot(qh, keys.AsSpan(p * kvDim + g * hd, hd)) * scale;
            StableSoftMax.Compute(s, s);
            var o = output.AsSpan((t * c.Heads + h) * hd, hd);
            o.Clear();
            for (int p = 0; p < len; p++) TensorPrimitives.MultiplyAdd(values.AsSpan(p * kvDim + g * hd, hd), s[p], o, o);
        }
        int items = n * c.Heads;
        if ((long)items * (pos0 + n) * hd < 1 << 16)
        {
            var scores = new float[pos0 + n];
            for (int i = 0; i < items; i++) One(i, scores);
        }
        else Parallel.For(0, items, () => new float[pos0 + n], (i, _, scores) => { One(i, scores); return scores; }, _ => { });
    }

    /// <summary>gate ← silu(gate) · up.</summary>
    private static void SwiGlu(float[] gate, float[] up)
    {
        var sig = new float[gate.Length];
        TensorPrimitives.Sigmoid(gate, sig);
        TensorPrimitives.Multiply(gate, sig, gate);
        TensorPrimitives.Multiply(gate, up, gate);
    }
}

/// <summary>Receives the inputs of block linear layers from <see cref="ReferenceEngine.Observer"/>.</summary>
public interface ILinearInputObserver
{
    /// <summary>Layer <paramref name="layer"/>'s linear <paramref name="part"/> is about to multiply <paramref name="input"/> ([tokens, cols], row-major).</summary>
    void Observe(int layer, string part, ReadOnlySpan<float> input, int tokens, int cols);
}

/// <summary>The reference engine's KV cache: per layer, [capacity, kvDim] keys and values in fp32.</summary>
internal sealed class ReferenceKvCache : KvCache
{
    public ReferenceKvCache(LlamaConfig owner, int capacity)
    {
        Owner = owner;
        Capacity = capacity;
        Keys = new float[owner.Layers][];
        Values = new float[owner.Layers][];
        for (int l = 0; l < owner.Layers; l++)
        {
            Keys[l] = new float[(long)capacity * owner.KvDim];
            Values[l] = new float[(long)capacity * owner.KvDim];
        }
    }

    public LlamaConfig Owner { get; }
    public override int Capacity { get; }
    public float[][] Keys { get; }
    public float[][] Values { get; }
    public void Advance(int n) => Length += n;

    private protected override void CopyPositions(KvCache destination, int count)
    {
        var to = (ReferenceKvCache)destination;
        if (to.Owner != Owner) throw new ArgumentException("the caches come from different engines.", nameof(destination));
        for (int l = 0; l < Owner.Layers; l++)
        {
            Array.Copy(Keys[l], to.Keys[l], (long)count * Owner.KvDim);
            Array.Copy(Values[l], to.Values[l], (long)count * Owner.KvDim);
        }
    }

    protected override void Erase(int from, int to)
    {
        int kvDim = Owner.KvDim;
        for (int l = 0; l < Owner.Layers; l++)
        {
            Keys[l].AsSpan(from * kvDim, (to - from) * kvDim).Clear();
            Values[l].AsSpan(from * kvDim, (to - from) * kvDim).Clear();
        }
    }

    internal override IReadOnlyList<float[]> Buffers => [.. Keys, .. Values];
}
