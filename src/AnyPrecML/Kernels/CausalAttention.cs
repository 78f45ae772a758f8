using System.Numerics;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace AnyPrecML.Kernels;

/// <summary>
/// Causal grouped-query attention on the CPU over a key/value cache laid out [kv_heads, capacity, head_dim] (as ONNX
/// Runtime's GroupQueryAttention keeps it): rotates the new tokens' q and k (RoPE), appends k and v at their positions in
/// place, and attends every query to the positions up to its own. Short calls (decode steps, speculative verification)
/// run one work item per (token, KV head) on the kernel pool, whose query heads share one read of that KV head's cache
/// rows: at 512 tokens of context a decode step of the 1.1B shape took 17.2-18.1 ms with it against 21.0-22.2 with
/// GroupQueryAttention's CPU kernel, which packs every head's keys for a matrix product per call. Calls of
/// <see cref="BlockedTokens"/> or more (prompts) run two matrix products per (KV head, block of tokens) instead
/// (<see cref="BlockedJob"/>). It is the CPU engine's only attention. Checked against a float64 reference in the tests.
/// </summary>
public static unsafe class CausalAttention
{
    /// <summary>The shape of one layer's attention.</summary>
    /// <param name="Heads">Query heads.</param>
    /// <param name="KvHeads">Key/value heads (Heads is a multiple).</param>
    /// <param name="HeadDim">Width of a head (even).</param>
    /// <param name="Interleaved">RoPE rotates pairs (2j, 2j+1) (llama2.c) rather than (j, j + HeadDim/2) (Hugging Face).</param>
    public readonly record struct Shape(int Heads, int KvHeads, int HeadDim, bool Interleaved)
    {
        /// <summary>Floats per token of the packed q,k,v input.</summary>
        public int PackedWidth => (Heads + 2 * KvHeads) * HeadDim;
    }

    /// <summary>
    /// Attention of <paramref name="tokens"/> new tokens at positions past..past+tokens−1. <paramref name="qkv"/>: per
    /// token q (Heads·HeadDim), k and v (KvHeads·HeadDim each), q and k not yet rotated. <paramref name="keys"/>,
    /// <paramref name="values"/>: the cache [KvHeads, capacity, HeadDim], valid below <paramref name="past"/>; the new
    /// rows are written there. <paramref name="cos"/>, <paramref name="sin"/>: [positions, HeadDim/2] angles.
    /// <paramref name="output"/>: per token, every head's HeadDim values. The loops are AggressiveOptimization, as the
    /// bitplane kernels are: a generation's first tokens never run tier-0 code.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Run(Shape shape, ReadOnlySpan<float> qkv, int tokens, float* keys, float* values, int capacity, int past,
        ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, float scale, Span<float> output, KernelThreadPool pool)
    {
        int hd = shape.HeadDim, qDim = shape.Heads * hd;
        if (shape.Heads % shape.KvHeads != 0 || hd % 2 != 0) throw new ArgumentException($"{shape}: heads must be a multiple of KV heads and the head width even.");
        if (qkv.Length != tokens * shape.PackedWidth || output.Length != tokens * qDim) throw new ArgumentException($"{tokens} tokens: q,k,v holds {qkv.Length} floats and the output {output.Length}.");
        if (past < 0 || past + tokens > capacity) throw new ArgumentOutOfRangeException(nameof(past), past, $"{past} past positions and {tokens} new ones do not fit the cache's {capacity}.");
        if (cos.Length < (past + tokens) * (hd / 2) || sin.Length != cos.Length) throw new ArgumentException($"the RoPE tables stop before position {past + tokens - 1}.");
        // The rotated queries, which both paths read.
        if (t_q is null || t_q.Length < tokens * qDim) t_q = new float[tokens * qDim];
        bool blocked = tokens >= BlockedTokens && hd % (2 * Vector<float>.Count) == 0;
        fixed (float* x = qkv, c = cos, s = sin, q = t_q, o = output)
        {
            var rope = t_rope ??= new RopeJob();
            rope.Set(shape, x, q, keys, values, capacity, past, c, s);
            // A prompt's rotations are a few milliseconds of one thread (512 tokens, 40 heads of 64): on the pool.
            if (blocked) pool.Run(rope, tokens, 4);
            else rope.Execute(0, tokens);
            rope.Clear();
            if (blocked)
            {
                var products = t_blocked ??= new BlockedJob();
                products.Set(shape, q, keys, values, capacity, past, tokens, scale, o);
                pool.Run(products, products.KeyTiles, 4);
                products.Attend();
                pool.Run(products, products.Items, 1);
                products.Clear();
                return;
            }
            var job = t_job ??= new AttentionJob();
            job.Set(shape, q, keys, values, capacity, past, scale, o);
            int items = tokens * shape.KvHeads;
            // A short context's few items run on the calling thread: waking the pool would cost more than they do.
            pool.Run(job, items, (long)items * (past + tokens) * hd < 1 << 15 ? items : 1);
            job.Clear();
        }
    }

    [ThreadStatic] private static RopeJob? t_rope;
    [ThreadStatic] private static float[]? t_q;

    /// <summary>Per new token: q rotated into the job's buffer, k rotated and v copied into the cache at the token's position.</summary>
    private sealed class RopeJob : IRangeJob
    {
        private Shape _shape;
        private float* _qkv, _q, _keys, _values, _cos, _sin;
        private int _capacity, _past;

        public void Set(Shape shape, float* qkv, float* q, float* keys, float* values, int capacity, int past, float* cos, float* sin)
        {
            _shape = shape; _qkv = qkv; _q = q; _keys = keys; _values = values; _capacity = capacity; _past = past; _cos = cos; _sin = sin;
        }

        public void Clear() { _qkv = _q = _keys = _values = _cos = _sin = null; }

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Execute(int start, int end)
        {
            int hd = _shape.HeadDim, half = hd / 2, qDim = _shape.Heads * hd, kvDim = _shape.KvHeads * hd;
            for (int t = start; t < end; t++)
            {
                float* row = _qkv + (long)t * _shape.PackedWidth;
                int pos = _past + t;
                float* c = _cos + (long)pos * half, s = _sin + (long)pos * half;
                for (int h = 0; h < _shape.Heads; h++) Rotate(row + h * hd, _q + (long)t * qDim + h * hd, c, s, hd, _shape.Interleaved);
                for (int g = 0; g < _shape.KvHeads; g++)
                {
                    long at = ((long)g * _capacity + pos) * hd;
                    Rotate(row + qDim + g * hd, _keys + at, c, s, hd, _shape.Interleaved);
                    new ReadOnlySpan<float>(row + qDim + kvDim + g * hd, hd).CopyTo(new Span<float>(_values + at, hd));
                }
            }
        }
    }

    /// <summary>Calls of at least this many tokens run <see cref="BlockedJob"/>; shorter ones one item per (token, KV head).</summary>
    public const int BlockedTokens = 8;

    [ThreadStatic] private static BlockedJob? t_blocked;

    /// <summary>
    /// Attention of many tokens as two matrix products per (KV head, block of tokens): the block's queries (every query
    /// head of the group, about 64 rows) against 2·W keys at a time, S = Q·Kᵀ from a transposed copy of those keys so each
    /// step is a broadcast of one query value times two vectors of keys (4 rows × 2 vectors of accumulators), then the
    /// softmax of each row up to its own position, then O = P·V, 4 rows × 2 vectors of head width at a time.
    /// </summary>
    private sealed class BlockedJob : IRangeJob
    {
        private Shape _shape;
        private float* _q, _keys, _values, _output, _keysT;
        private int _capacity, _past, _tokens, _blockTokens, _blocks, _tiles;
        private float _scale;
        private bool _attend;
        private float[] _keysTBuffer = [];
        [ThreadStatic] private static float[]? t_scores;

        /// <summary>Work items of the transposition: (KV head, tile of 2·W keys).</summary>
        public int KeyTiles => _tiles * _shape.KvHeads;

        /// <summary>Work items of the products: (KV head, block of tokens).</summary>
        public int Items => _blocks * _shape.KvHeads;

        public void Set(Shape shape, float* q, float* keys, float* values, int capacity, int past, int tokens, float scale, float* output)
        {
            _shape = shape; _q = q; _keys = keys; _values = values; _capacity = capacity; _past = past; _tokens = tokens; _scale = scale; _output = output;
            // About 64 query rows per item: each transposed key tile serves them all, and the scores stay in L2.
            _blockTokens = Math.Max(1, 64 / (shape.Heads / shape.KvHeads));
            _blocks = (tokens + _blockTokens - 1) / _blockTokens;
            int tile = 2 * Vector<float>.Count;
            _tiles = (past + tokens + tile - 1) / tile;
            long need = (long)shape.KvHeads * _tiles * tile * shape.HeadDim;
            if (_keysTBuffer.Length < need) _keysTBuffer = GC.AllocateUninitializedArray<float>(checked((int)need), pinned: true);
            _keysT = (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(_keysTBuffer));
            _attend = false;
        }

        /// <summary>Switches from the transposition to the products.</summary>
        public void Attend() => _attend = true;

        public void Clear() { _q = _keys = _values = _output = _keysT = null; }

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Execute(int start, int end)
        {
            for (int item = start; item < end; item++)
                if (_attend) Block(item % _shape.KvHeads, item / _shape.KvHeads);
                else Transpose(item / _tiles, item % _tiles);
        }

        /// <summary>KV head g's keys of tile i as [head width][2·W keys], zero past the last position.</summary>
        private void Transpose(int g, int i)
        {
            int tile = 2 * Vector<float>.Count, hd = _shape.HeadDim, kb = i * tile, n = Math.Min(tile, _past + _tokens - kb);
            float* k = _keys + ((long)g * _capacity + kb) * hd, kt = TileOf(g, i);
            for (int d = 0; d < hd; d++)
            {
                for (int j = 0; j < n; j++) kt[d * tile + j] = k[(long)j * hd + d];
                for (int j = n; j < tile; j++) kt[d * tile + j] = 0;
            }
        }

        private float* TileOf(int g, int i) => _keysT + ((long)g * _tiles + i) * 2 * Vector<float>.Count * _shape.HeadDim;

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        private void Block(int g, int block)
        {
            int w = Vector<float>.Count, tile = 2 * w, hd = _shape.HeadDim, group = _shape.Heads / _shape.KvHeads, qDim = _shape.Heads * hd;
            int t0 = block * _blockTokens, t1 = Math.Min(_tokens, t0 + _blockTokens), rows = (t1 - t0) * group;
            int length = _past + t1, stride = (length + tile - 1) / tile * tile;
            if (t_scores is null || t_scores.Length < rows * stride) t_scores = new float[Math.Max(rows * stride, 1 << 14)];
            float* v = _values + (long)g * _capacity * hd;
            // Row r is token t0 + r / group, query head g·group + r % group; it sees positions below Limit(r).
            float* Query(int r) => _q + (long)(t0 + r / group) * qDim + (g * group + r % group) * hd;
            int Limit(int r) => _past + t0 + r / group + 1;
            fixed (float* scores = t_scores)
            {
                for (int kb = 0; kb < length; kb += tile)
                {
                    float* kt = TileOf(g, kb / tile);
                    // Rows are in token order, so a tile of rows whose last row ends at or before kb needs nothing here.
                    for (int r = 0; r < rows; r += 4)
                    {
                        int last = Math.Min(r + 3, rows - 1);
                        if (Limit(last) <= kb) continue;
                        float* q0 = Query(r), q1 = Query(Math.Min(r + 1, last)), q2 = Query(Math.Min(r + 2, last)), q3 = Query(last);
                        Vector<float> a0 = default, b0 = default, a1 = default, b1 = default, a2 = default, b2 = default, a3 = default, b3 = default;
                        for (int d = 0; d < hd; d++)
                        {
                            var lo = Unsafe.ReadUnaligned<Vector<float>>(kt + d * tile);
                            var hi = Unsafe.ReadUnaligned<Vector<float>>(kt + d * tile + w);
                            var x0 = new Vector<float>(q0[d]); a0 = Vector.MultiplyAddEstimate(x0, lo, a0); b0 = Vector.MultiplyAddEstimate(x0, hi, b0);
                            var x1 = new Vector<float>(q1[d]); a1 = Vector.MultiplyAddEstimate(x1, lo, a1); b1 = Vector.MultiplyAddEstimate(x1, hi, b1);
                            var x2 = new Vector<float>(q2[d]); a2 = Vector.MultiplyAddEstimate(x2, lo, a2); b2 = Vector.MultiplyAddEstimate(x2, hi, b2);
                            var x3 = new Vector<float>(q3[d]); a3 = Vector.MultiplyAddEstimate(x3, lo, a3); b3 = Vector.MultiplyAddEstimate(x3, hi, b3);
                        }
                        var sc = new Vector<float>(_scale);
                        float* s0 = scores + (long)r * stride + kb;
                        Unsafe.WriteUnaligned(s0, a0 * sc); Unsafe.WriteUnaligned(s0 + w, b0 * sc);
                        if (r + 1 <= last) { Unsafe.WriteUnaligned(s0 + stride, a1 * sc); Unsafe.WriteUnaligned(s0 + stride + w, b1 * sc); }
                        if (r + 2 <= last) { Unsafe.WriteUnaligned(s0 + 2 * stride, a2 * sc); Unsafe.WriteUnaligned(s0 + 2 * stride + w, b2 * sc); }
                        if (r + 3 <= last) { Unsafe.WriteUnaligned(s0 + 3 * stride, a3 * sc); Unsafe.WriteUnaligned(s0 + 3 * stride + w, b3 * sc); }
                    }
                }
                // Each row's softmax over its own positions; the rest of the row is zeroed for the product with V.
                for (int r = 0; r < rows; r++)
                {
                    var row = new Span<float>(scores + (long)r * stride, stride);
                    int limit = Limit(r);
                    StableSoftMax.Compute(row[..limit], row);
                    row[limit..].Clear();
                }
                for (int r = 0; r < rows; r += 4)
                {
                    int last = Math.Min(r + 3, rows - 1), reach = Limit(last);
                    float* p0 = scores + (long)r * stride, p1 = scores + (long)Math.Min(r + 1, last) * stride;
                    float* p2 = scores + (long)Math.Min(r + 2, last) * stride, p3 = scores + (long)last * stride;
                    for (int d0 = 0; d0 < hd; d0 += tile)
                    {
                        Vector<float> a0 = default, b0 = default, a1 = default, b1 = default, a2 = default, b2 = default, a3 = default, b3 = default;
                        for (int p = 0; p < reach; p++)
                        {
                            float* vr = v + (long)p * hd + d0;
                            var lo = Unsafe.ReadUnaligned<Vector<float>>(vr);
                            var hi = Unsafe.ReadUnaligned<Vector<float>>(vr + w);
                            var x0 = new Vector<float>(p0[p]); a0 = Vector.MultiplyAddEstimate(x0, lo, a0); b0 = Vector.MultiplyAddEstimate(x0, hi, b0);
                            var x1 = new Vector<float>(p1[p]); a1 = Vector.MultiplyAddEstimate(x1, lo, a1); b1 = Vector.MultiplyAddEstimate(x1, hi, b1);
                            var x2 = new Vector<float>(p2[p]); a2 = Vector.MultiplyAddEstimate(x2, lo, a2); b2 = Vector.MultiplyAddEstimate(x2, hi, b2);
                            var x3 = new Vector<float>(p3[p]); a3 = Vector.MultiplyAddEstimate(x3, lo, a3); b3 = Vector.MultiplyAddEstimate(x3, hi, b3);
                        }
                        Store(Output(r) + d0, a0, b0, w);
                        if (r + 1 <= last) Store(Output(r + 1) + d0, a1, b1, w);
                        if (r + 2 <= last) Store(Output(r + 2) + d0, a2, b2, w);
                        if (r + 3 <= last) Store(Output(r + 3) + d0, a3, b3, w);
                    }
                }
            }
            float* Output(int r) => _output + (long)(t0 + r / group) * qDim + (g * group + r % group) * hd;
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private static void Store(float* o, Vector<float> lo, Vector<float> hi, int w)
        {
            Unsafe.WriteUnaligned(o, lo);
            Unsafe.WriteUnaligned(o + w, hi);
        }
    }

    [ThreadStatic] private static AttentionJob? t_job;

    /// <summary>Rotates each pair of x's <paramref name="hd"/> values by its angle into y.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Rotate(float* x, float* y, float* cos, float* sin, int hd, bool interleaved)
    {
        int half = hd / 2, j = 0;
        if (!interleaved)
            // Half-split pairs (j, j + half) are two contiguous runs: whole vectors of each.
            for (int w = Vector<float>.Count; j + w <= half; j += w)
            {
                var a = Unsafe.ReadUnaligned<Vector<float>>(x + j);
                var b = Unsafe.ReadUnaligned<Vector<float>>(x + j + half);
                var c = Unsafe.ReadUnaligned<Vector<float>>(cos + j);
                var s = Unsafe.ReadUnaligned<Vector<float>>(sin + j);
                Unsafe.WriteUnaligned(y + j, a * c - b * s);
                Unsafe.WriteUnaligned(y + j + half, a * s + b * c);
            }
        for (; j < half; j++)
        {
            int i0 = interleaved ? 2 * j : j, i1 = interleaved ? i0 + 1 : j + half;
            float a = x[i0], b = x[i1];
            y[i0] = a * cos[j] - b * sin[j];
            y[i1] = a * sin[j] + b * cos[j];
        }
    }

    /// <summary>One call's arguments, reused by the calling thread; items are (token, KV head) pairs.</summary>
    private sealed class AttentionJob : IRangeJob
    {
        private Shape _shape;
        private float* _q, _keys, _values, _output;
        private int _capacity, _past;
        private float _scale;
        [ThreadStatic] private static float[]? t_scores;

        public void Set(Shape shape, float* q, float* keys, float* values, int capacity, int past, float scale, float* output)
        {
            _shape = shape; _q = q; _keys = keys; _values = values; _capacity = capacity; _past = past; _scale = scale; _output = output;
        }

        public void Clear() { _q = _keys = _values = _output = null; }

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Execute(int start, int end)
        {
            int hd = _shape.HeadDim, group = _shape.Heads / _shape.KvHeads, qDim = _shape.Heads * hd;
            // Keys and values go by in chunks small enough for L1, and every query head of the group reads a chunk before
            // the next comes: a KV head's cache is read once per token, not once per query head. (At 2000 positions one KV
            // head's keys and values are 1 MB, past L2: read eight times over, they came from L3 every time.)
            int chunk = Math.Max(4, (16 << 10) / (hd * sizeof(float)) & ~3);
            for (int item = start; item < end; item++)
            {
                int t = item / _shape.KvHeads, g = item % _shape.KvHeads, length = _past + t + 1;
                if (t_scores is null || t_scores.Length < group * length) t_scores = new float[Math.Max(group * length, 256)];
                float* k = _keys + (long)g * _capacity * hd, v = _values + (long)g * _capacity * hd;
                float* q = _q + t * qDim + g * group * hd, o = _output + t * qDim + g * group * hd;
                fixed (float* scores = t_scores)
                {
                    for (int p = 0; p < length; p += chunk)
                    {
                        int n = Math.Min(chunk, length - p);
                        for (int i = 0; i < group; i++) Scores(q + i * hd, k + (long)p * hd, hd, n, _scale, new Span<float>(scores + i * length + p, n));
                    }
                    for (int i = 0; i < group; i++)
                    {
                        var row = new Span<float>(scores + i * length, length);
                        StableSoftMax.Compute(row, row); // as the reference engine's attention
                    }
                    new Span<float>(o, group * hd).Clear();
                    for (int p = 0; p < length; p += chunk)
                    {
                        int n = Math.Min(chunk, length - p);
                        for (int i = 0; i < group; i++) Mix(scores + i * length + p, v + (long)p * hd, hd, n, o + i * hd);
                    }
                }
            }
        }
    }

    /// <summary>scores[p] = scale · q·K[p] for p &lt; length (rows hd floats apart): four keys at a time, one accumulator each.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Scores(float* q, float* k, int hd, int length, float scale, Span<float> scores)
    {
        int w = Vector<float>.Count, p = 0;
        if (hd % w == 0)
            for (; p + 4 <= length; p += 4)
            {
                float* k0 = k + (long)p * hd, k1 = k0 + hd, k2 = k1 + hd, k3 = k2 + hd;
                Vector<float> a0 = default, a1 = default, a2 = default, a3 = default;
                for (int i = 0; i < hd; i += w)
                {
                    var qi = Unsafe.ReadUnaligned<Vector<float>>(q + i);
                    a0 = Vector.MultiplyAddEstimate(qi, Unsafe.ReadUnaligned<Vector<float>>(k0 + i), a0);
                    a1 = Vector.MultiplyAddEstimate(qi, Unsafe.ReadUnaligned<Vector<float>>(k1 + i), a1);
                    a2 = Vector.MultiplyAddEstimate(qi, Unsafe.ReadUnaligned<Vector<float>>(k2 + i), a2);
                    a3 = Vector.MultiplyAddEstimate(qi, Unsafe.ReadUnaligned<Vector<float>>(k3 + i), a3);
                }
                scores[p] = Vector.Sum(a0) * scale; scores[p + 1] = Vector.Sum(a1) * scale;
                scores[p + 2] = Vector.Sum(a2) * scale; scores[p + 3] = Vector.Sum(a3) * scale;
            }
        for (; p < length; p++)
        {
            float s = 0;
            for (int i = 0; i < hd; i++) s += q[i] * k[(long)p * hd + i];
            scores[p] = s * scale;
        }
    }

    /// <summary>
    /// o += Σ_p probs[p]·V[p]. Four vectors of o at a time, rows two by two (eight FMA chains: their latency is four
    /// cycles): each row's probability is broadcast once per four vectors, where a loop over o's vectors with the rows
    /// inside broadcast it once per vector and went over the rows hd/W times. Then single vectors, then single floats.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void Mix(float* probs, float* v, int hd, int length, float* o)
    {
        int w = Vector<float>.Count, i = 0;
        for (; i + 4 * w <= hd; i += 4 * w)
        {
            Vector<float> a0 = default, a1 = default, a2 = default, a3 = default, b0 = default, b1 = default, b2 = default, b3 = default;
            float* r = v + i, pp = probs, pairs = probs + (length & ~1);
            for (; pp < pairs; pp += 2, r += 2 * hd)
            {
                float* s = r + hd;
                var pa = new Vector<float>(pp[0]);
                var pb = new Vector<float>(pp[1]);
                a0 = Vector.MultiplyAddEstimate(pa, Unsafe.ReadUnaligned<Vector<float>>(r), a0);
                a1 = Vector.MultiplyAddEstimate(pa, Unsafe.ReadUnaligned<Vector<float>>(r + w), a1);
                a2 = Vector.MultiplyAddEstimate(pa, Unsafe.ReadUnaligned<Vector<float>>(r + 2 * w), a2);
                a3 = Vector.MultiplyAddEstimate(pa, Unsafe.ReadUnaligned<Vector<float>>(r + 3 * w), a3);
                b0 = Vector.MultiplyAddEstimate(pb, Unsafe.ReadUnaligned<Vector<float>>(s), b0);
                b1 = Vector.MultiplyAddEstimate(pb, Unsafe.ReadUnaligned<Vector<float>>(s + w), b1);
                b2 = Vector.MultiplyAddEstimate(pb, Unsafe.ReadUnaligned<Vector<float>>(s + 2 * w), b2);
                b3 = Vector.MultiplyAddEstimate(pb, Unsafe.ReadUnaligned<Vector<float>>(s + 3 * w), b3);
            }
            if ((length & 1) != 0)
            {
                var pa = new Vector<float>(*pp);
                a0 = Vector.MultiplyAddEstimate(pa, Unsafe.ReadUnaligned<Vector<float>>(r), a0);
                a1 = Vector.MultiplyAddEstimate(pa, Unsafe.ReadUnaligned<Vector<float>>(r + w), a1);
                a2 = Vector.MultiplyAddEstimate(pa, Unsafe.ReadUnaligned<Vector<float>>(r + 2 * w), a2);
                a3 = Vector.MultiplyAddEstimate(pa, Unsafe.ReadUnaligned<Vector<float>>(r + 3 * w), a3);
            }
            AddTo(o + i, a0 + b0); AddTo(o + i + w, a1 + b1); AddTo(o + i + 2 * w, a2 + b2); AddTo(o + i + 3 * w, a3 + b3);
        }
        for (; i + w <= hd; i += w)
        {
            Vector<float> a0 = default, a1 = default;
            int p = 0;
            for (; p + 2 <= length; p += 2)
            {
                float* r = v + (long)p * hd + i;
                a0 = Vector.MultiplyAddEstimate(new Vector<float>(probs[p]), Unsafe.ReadUnaligned<Vector<float>>(r), a0);
                a1 = Vector.MultiplyAddEstimate(new Vector<float>(probs[p + 1]), Unsafe.ReadUnaligned<Vector<float>>(r + hd), a1);
            }
            if (p < length) a0 = Vector.MultiplyAddEstimate(new Vector<float>(probs[p]), Unsafe.ReadUnaligned<Vector<float>>(v + (long)p * hd + i), a0);
            AddTo(o + i, a0 + a1);
        }
        for (; i < hd; i++)
        {
            float s = 0;
            for (int p = 0; p < length; p++) s += probs[p] * v[(long)p * hd + i];
            o[i] += s;
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void AddTo(float* o, Vector<float> x) => Unsafe.WriteUnaligned(o, Unsafe.ReadUnaligned<Vector<float>>(o) + x);
}
