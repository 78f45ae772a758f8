using System.Numerics;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using AnyPrecML.Models;

namespace AnyPrecML.Kernels;

/// <summary>
/// Causal grouped-query attention on the CPU over a key/value cache laid out [kv_heads, capacity, head_dim] (as ONNX
/// Runtime's GroupQueryAttention keeps it): rotates the new tokens' q and k (RoPE), appends k and v at their positions in
/// place, and attends every query to the positions up to its own. Short calls (decode steps, speculative verification)
/// run one work item per (token, KV head) on the kernel pool, whose query heads share one read of that KV head's cache
/// rows: at 512 tokens of context a decode step of the 1.1B shape took 17.2-18.1 ms with it against 21.0-22.2 with
/// GroupQueryAttention's CPU kernel, which packs every head's keys for a matrix product per call. Calls of
/// <see cref="BlockedTokens"/> or more (prompts) run two matrix products per (KV head, block of tokens) instead
/// (<see cref="BlockedJob"/>). The cache holds fp32 or bf16 (<see cref="KvCacheType"/>): decode steps read bf16 rows in
/// place (<see cref="ScoresBf16"/>, <see cref="MixBf16"/>: half the bytes); prompts, and head widths those loops cannot
/// take, widen the rows they need into a buffer for the fp32 loops. When the model has fewer KV heads than the pool has
/// threads, each token's positions are split among threads as a decode step's would be, and the parts merged by their
/// softmax maxima and sums (<see cref="Splits"/>, flash-decoding). It is the CPU engine's only attention. Checked against
/// a float64 reference in the tests.
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
    /// <paramref name="output"/>: per token, every head's HeadDim values. <paramref name="cacheType"/>: what the cache's
    /// elements are (fp32, or bf16 bits as ushort; new rows are rounded to nearest even). The loops are
    /// AggressiveOptimization, as the bitplane kernels are: a generation's first tokens never run tier-0 code.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Run(Shape shape, ReadOnlySpan<float> qkv, int tokens, KvCacheType cacheType, void* keys, void* values, int capacity, int past,
        ReadOnlySpan<float> cos, ReadOnlySpan<float> sin, float scale, Span<float> output, KernelThreadPool pool)
    {
        if (cacheType is not (KvCacheType.Float32 or KvCacheType.BFloat16)) throw new ArgumentOutOfRangeException(nameof(cacheType), cacheType, "fp32 or bf16 caches only.");
        var cache = new Cache(keys, values, capacity, shape.HeadDim, cacheType == KvCacheType.BFloat16);
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
            rope.Set(shape, x, q, cache, past, c, s);
            // A prompt's rotations are a few milliseconds of one thread (512 tokens, 40 heads of 64): on the pool.
            if (blocked) pool.Run(rope, tokens, 4);
            else rope.Execute(0, tokens);
            rope.Clear();
            if (blocked)
            {
                var products = t_blocked ??= new BlockedJob();
                products.Set(shape, q, cache, past, tokens, scale, o);
                pool.Run(products, products.KeyTiles, 4);
                products.Attend();
                pool.Run(products, products.Items, 1);
                products.Clear();
                return;
            }
            var job = t_job ??= new AttentionJob();
            // Each token is split as a decode step at its position would be (by the KV heads alone, whatever else the
            // call holds): its result must not depend on the call. The call's last token has the most positions.
            int pairs = tokens * shape.KvHeads, splits = Splits(shape.KvHeads, past + tokens, pool.Threads);
            job.Set(shape, q, cache, past, scale, o, splits, tokens, pool.Threads);
            int items = pairs * splits;
            // A short context's few items run on the calling thread: waking the pool would cost more than they do.
            pool.Run(job, items, (long)pairs * (past + tokens) * hd < 1 << 15 ? items : 1);
            if (splits > 1) job.Merge();
            job.Clear();
        }
    }

    [ThreadStatic] private static RopeJob? t_rope;
    [ThreadStatic] private static float[]? t_q;

    /// <summary>
    /// One layer's keys and values, [KvHeads, capacity, HeadDim] each, fp32 or bf16. Rows are read as fp32 through
    /// <see cref="Rows"/> (in place, or widened into a buffer), as bf16 in place through <see cref="Bf16Rows"/>, and written
    /// through <see cref="Write"/>.
    /// </summary>
    private readonly struct Cache(void* keys, void* values, int capacity, int hd, bool bf16)
    {
        public readonly int Capacity = capacity;
        public readonly bool Bf16 = bf16;

        /// <summary>Where row <paramref name="position"/> of KV head <paramref name="g"/> starts, in elements.</summary>
        private long At(int g, int position) => ((long)g * Capacity + position) * hd;

        /// <summary>
        /// Rows p..p+n−1 of KV head g's keys (or values) as fp32: the cache itself when it is fp32, else those rows
        /// widened into <paramref name="buffer"/> (n·HeadDim floats).
        /// </summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public float* Rows(bool value, int g, int p, int n, float* buffer)
        {
            void* start = value ? values : keys;
            if (!Bf16) return (float*)start + At(g, p);
            TensorEncoding.WidenBFloat16(new ReadOnlySpan<ushort>((ushort*)start + At(g, p), n * hd), new Span<float>(buffer, n * hd));
            return buffer;
        }

        /// <summary>Row <paramref name="p"/> of KV head g's bf16 keys (or values), in place.</summary>
        public ushort* Bf16Rows(bool value, int g, int p) => (ushort*)(value ? values : keys) + At(g, p);

        /// <summary>Stores one row (HeadDim floats) at position <paramref name="position"/> of KV head g's keys or values.</summary>
        public void Write(bool value, int g, int position, float* row)
        {
            void* start = value ? values : keys;
            if (!Bf16) { new ReadOnlySpan<float>(row, hd).CopyTo(new Span<float>((float*)start + At(g, position), hd)); return; }
            ushort* dst = (ushort*)start + At(g, position);
            for (int i = 0; i < hd; i++) dst[i] = TensorEncoding.ToBFloat16(row[i]);
        }
    }

    /// <summary>Per new token: q rotated into the job's buffer, k rotated and v copied into the cache at the token's position.</summary>
    private sealed class RopeJob : IRangeJob
    {
        private Shape _shape;
        private float* _qkv, _q, _cos, _sin;
        private Cache _cache;
        private int _past;

        public void Set(Shape shape, float* qkv, float* q, Cache cache, int past, float* cos, float* sin)
        {
            _shape = shape; _qkv = qkv; _q = q; _cache = cache; _past = past; _cos = cos; _sin = sin;
        }

        public void Clear() { _qkv = _q = _cos = _sin = null; _cache = default; }

        [SkipLocalsInit]
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Execute(int start, int end)
        {
            int hd = _shape.HeadDim, half = hd / 2, qDim = _shape.Heads * hd, kvDim = _shape.KvHeads * hd;
            float* rotated = stackalloc float[hd];
            for (int t = start; t < end; t++)
            {
                float* row = _qkv + (long)t * _shape.PackedWidth;
                int pos = _past + t;
                float* c = _cos + (long)pos * half, s = _sin + (long)pos * half;
                for (int h = 0; h < _shape.Heads; h++) Rotate(row + h * hd, _q + (long)t * qDim + h * hd, c, s, hd, _shape.Interleaved);
                for (int g = 0; g < _shape.KvHeads; g++)
                {
                    Rotate(row + qDim + g * hd, rotated, c, s, hd, _shape.Interleaved);
                    _cache.Write(false, g, pos, rotated);
                    _cache.Write(true, g, pos, row + qDim + kvDim + g * hd);
                }
            }
        }
    }

    /// <summary>
    /// Calls of at least this many tokens (prompts) run <see cref="BlockedJob"/>; shorter ones one item per (token, KV
    /// head), which gives each token bit for bit what a decode step at its position gives (the same loops in the same
    /// order, the same splits): a verification pass of up to 64 drafts (65 tokens) then leaves speculative greedy
    /// output identical to target-only greedy output. (At 8, a verification pass of 9 tokens ran blocked, whose sums
    /// run in another order, and a near-tie flipped a greedy token.)
    /// </summary>
    public const int BlockedTokens = 66;

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
        private float* _q, _output, _keysT, _values;
        private Cache _cache;
        private int _past, _tokens, _blockTokens, _blocks, _tiles;
        private float _scale;
        private bool _attend;
        // A bf16 cache's values, widened to fp32 once per call in the transposition's tiles ([KvHeads, tiles·2·W, hd]):
        // every block of tokens reads them.
        private float[] _keysTBuffer = [], _valuesBuffer = [];
        [ThreadStatic] private static float[]? t_scores;

        /// <summary>Work items of the transposition (of the keys, and the widening of bf16 values): (KV head, tile of 2·W positions).</summary>
        public int KeyTiles => _tiles * _shape.KvHeads;

        /// <summary>Work items of the products: (KV head, block of tokens).</summary>
        public int Items => _blocks * _shape.KvHeads;

        public void Set(Shape shape, float* q, Cache cache, int past, int tokens, float scale, float* output)
        {
            _shape = shape; _q = q; _cache = cache; _past = past; _tokens = tokens; _scale = scale; _output = output;
            // About 64 query rows per item: each transposed key tile serves them all, and the scores stay in L2.
            _blockTokens = Math.Max(1, 64 / (shape.Heads / shape.KvHeads));
            _blocks = (tokens + _blockTokens - 1) / _blockTokens;
            int tile = 2 * Vector<float>.Count;
            _tiles = (past + tokens + tile - 1) / tile;
            long need = (long)shape.KvHeads * _tiles * tile * shape.HeadDim;
            if (_keysTBuffer.Length < need) _keysTBuffer = GC.AllocateUninitializedArray<float>(checked((int)need), pinned: true);
            _keysT = (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(_keysTBuffer));
            if (cache.Bf16 && _valuesBuffer.Length < need) _valuesBuffer = GC.AllocateUninitializedArray<float>(checked((int)need), pinned: true);
            _values = cache.Bf16 ? (float*)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(_valuesBuffer)) : null;
            _attend = false;
        }

        /// <summary>Switches from the transposition to the products.</summary>
        public void Attend() => _attend = true;

        public void Clear() { _q = _output = _keysT = _values = null; _cache = default; }

        /// <summary>KV head g's values as fp32: the cache's own rows, or (bf16) their widened copy.</summary>
        private float* Values(int g) => _cache.Bf16 ? _values + (long)g * _tiles * 2 * Vector<float>.Count * _shape.HeadDim : _cache.Rows(true, g, 0, 0, null);

        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Execute(int start, int end)
        {
            for (int item = start; item < end; item++)
                if (_attend) Block(item % _shape.KvHeads, item / _shape.KvHeads);
                else Transpose(item / _tiles, item % _tiles);
        }

        /// <summary>KV head g's keys of tile i as [head width][2·W keys], zero past the last position; a bf16 cache's values of the tile widened.</summary>
        [SkipLocalsInit]
        private void Transpose(int g, int i)
        {
            int tile = 2 * Vector<float>.Count, hd = _shape.HeadDim, kb = i * tile, n = Math.Min(tile, _past + _tokens - kb);
            float* widened = stackalloc float[_cache.Bf16 ? tile * hd : 0];
            float* k = _cache.Rows(false, g, kb, n, widened), kt = TileOf(g, i);
            if (_cache.Bf16) _cache.Rows(true, g, kb, n, Values(g) + (long)kb * hd);
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
            float* v = Values(g);
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

    /// <summary>Fewest positions a split of one (token, KV head) pair's attention covers (see <see cref="Splits"/>).</summary>
    public const int MinSplitPositions = 256;

    /// <summary>
    /// Parts a token's positions are split into per KV head (flash-decoding), given <paramref name="pairs"/> = the KV
    /// heads (what a decode step has; every token of a call is split as its own decode step would be, so its result
    /// does not depend on the call): 1 while the pairs alone give every thread work, else enough parts for every thread,
    /// none shorter than <see cref="MinSplitPositions"/>. A decode step has only as many items as KV heads (4 in
    /// TinyLlama, 8 in Llama-3-8B, 1 with multi-query attention), so on a machine with more cores than that the rest of
    /// the cores would wait out a long context's attention.
    /// </summary>
    internal static int Splits(int pairs, int positions, int threads) =>
        pairs >= threads ? 1 : Math.Clamp(positions / MinSplitPositions, 1, (threads + pairs - 1) / pairs);

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
        private float* _q, _output;
        private Cache _cache;
        private int _past, _splits, _tokens, _threads;
        private float _scale;
        // Split items' results (splits > 1): per item, every query head of the group's unnormalised output (hd floats),
        // then each head's score maximum and its sum of e^(score − maximum), merged by Merge.
        private float[] _partial = [];
        [ThreadStatic] private static float[]? t_scores;

        public void Set(Shape shape, float* q, Cache cache, int past, float scale, float* output, int splits, int tokens, int threads)
        {
            _shape = shape; _q = q; _cache = cache; _past = past; _scale = scale; _output = output; _splits = splits; _tokens = tokens; _threads = threads;
            long need = splits > 1 ? (long)tokens * shape.KvHeads * splits * PartialFloats : 0;
            if (_partial.Length < need) _partial = GC.AllocateUninitializedArray<float>(checked((int)need), pinned: true);
        }

        private int PartialFloats => _shape.Heads / _shape.KvHeads * (_shape.HeadDim + 2);

        public void Clear() { _q = _output = null; _cache = default; }

        /// <summary>Splits of token t's positions: a decode step's at that position (<see cref="Splits"/> by the KV heads alone).</summary>
        private int SplitsOf(int t) => Splits(_shape.KvHeads, _past + t + 1, _threads);

        /// <summary>
        /// Each (token, KV head) pair's output from its splits: per query head, o = Σ_s e^(m_s − M)·o_s / Σ_s e^(m_s − M)·l_s,
        /// M the largest split maximum m_s (every split's exponentials were taken against its own maximum).
        /// </summary>
        public void Merge()
        {
            int hd = _shape.HeadDim, group = _shape.Heads / _shape.KvHeads, qDim = _shape.Heads * hd, per = PartialFloats;
            fixed (float* partial = _partial)
                for (int pair = 0; pair < _tokens * _shape.KvHeads; pair++)
                {
                    int t = pair / _shape.KvHeads, g = pair % _shape.KvHeads, splits = SplitsOf(t);
                    if (splits == 1) continue; // written in place
                    float* first = partial + (long)pair * _splits * per;
                    for (int i = 0; i < group; i++)
                    {
                        float max = float.NegativeInfinity, sum = 0;
                        for (int sp = 0; sp < splits; sp++) max = Math.Max(max, first[sp * per + group * hd + i]);
                        var o = new Span<float>(_output + (long)t * qDim + (g * group + i) * hd, hd);
                        o.Clear();
                        for (int sp = 0; sp < splits; sp++)
                        {
                            float* part = first + sp * per;
                            float weight = MathF.Exp(part[group * hd + i] - max);
                            sum += weight * part[group * hd + group + i];
                            TensorPrimitives.MultiplyAdd(new ReadOnlySpan<float>(part + i * hd, hd), weight, o, o);
                        }
                        TensorPrimitives.Divide(o, sum, o);
                    }
                }
        }

        [SkipLocalsInit]
        [MethodImpl(MethodImplOptions.AggressiveOptimization)]
        public void Execute(int start, int end)
        {
            int hd = _shape.HeadDim, group = _shape.Heads / _shape.KvHeads, qDim = _shape.Heads * hd;
            // Keys and values go by in chunks small enough for L1, and every query head of the group reads a chunk before
            // the next comes: a KV head's cache is read once per token, not once per query head. (At 2000 positions one KV
            // head's keys and values are 1 MB, past L2: read eight times over, they came from L3 every time.)
            int chunk = Math.Max(4, (16 << 10) / (hd * sizeof(float)) & ~3);
            // bf16 rows are read in place by the paired loops (ScoresBf16, MixBf16), q and o in their pair order; head
            // widths those cannot take (not a multiple of 2·W) widen each chunk into a buffer for the fp32 loops.
            bool paired = _cache.Bf16 && hd % (2 * Vector<float>.Count) == 0;
            float* widened = stackalloc float[_cache.Bf16 && !paired ? chunk * hd : 0];
            float* qPairs = stackalloc float[paired ? group * hd : 0], oPairs = stackalloc float[paired ? group * hd : 0];
            for (int item = start; item < end; item++)
            {
                // Item = (token t, KV head g, split sp): positions [p0, p1) of the t-th token's 0..past + t, in that token's
                // own number of splits (earlier tokens of a call may have fewer: their extra items do nothing).
                int pair = item / _splits, sp = item % _splits, t = pair / _shape.KvHeads, g = pair % _shape.KvHeads, length = _past + t + 1, splits = SplitsOf(t);
                if (sp >= splits) continue;
                int p0 = (int)((long)length * sp / splits), p1 = (int)((long)length * (sp + 1) / splits), span = p1 - p0;
                if (t_scores is null || t_scores.Length < group * span) t_scores = new float[Math.Max(group * span, 256)];
                float* q = _q + t * qDim + g * group * hd;
                // One split: the output itself. Several: this split's part of the partial buffer, for Merge.
                bool whole = splits == 1;
                fixed (float* scores = t_scores, partial = _partial)
                {
                    float* o = whole ? _output + t * qDim + g * group * hd : partial + (long)item * PartialFloats;
                    if (paired) ToPairOrder(q, qPairs, group * hd);
                    for (int p = p0; p < p1; p += chunk)
                    {
                        int n = Math.Min(chunk, p1 - p);
                        if (paired)
                        {
                            ushort* k = _cache.Bf16Rows(false, g, p);
                            for (int i = 0; i < group; i++) ScoresBf16(qPairs + i * hd, k, hd, n, _scale, scores + i * span + p - p0);
                            continue;
                        }
                        float* kf = _cache.Rows(false, g, p, n, widened);
                        for (int i = 0; i < group; i++) Scores(q + i * hd, kf, hd, n, _scale, new Span<float>(scores + i * span + p - p0, n));
                    }
                    for (int i = 0; i < group; i++)
                    {
                        var row = new Span<float>(scores + i * span, span);
                        if (whole) { StableSoftMax.Compute(row, row); continue; } // as the reference engine's attention
                        // A split keeps its maximum and its sum of exponentials: Merge weighs the splits with them.
                        (o[group * hd + i], o[group * hd + group + i]) = StableSoftMax.Exponentiate(row, row);
                    }
                    float* sum = paired ? oPairs : o;
                    new Span<float>(sum, group * hd).Clear();
                    for (int p = p0; p < p1; p += chunk)
                    {
                        int n = Math.Min(chunk, p1 - p);
                        if (paired)
                        {
                            ushort* v = _cache.Bf16Rows(true, g, p);
                            for (int i = 0; i < group; i++) MixBf16(scores + i * span + p - p0, v, hd, n, sum + i * hd);
                            continue;
                        }
                        float* vf = _cache.Rows(true, g, p, n, widened);
                        for (int i = 0; i < group; i++) Mix(scores + i * span + p - p0, vf, hd, n, sum + i * hd);
                    }
                    if (paired) FromPairOrder(oPairs, o, group * hd);
                }
            }
        }
    }

    /// <summary>
    /// The order the paired bf16 loops keep q and o in: per 2·W values (one Vector&lt;uint&gt; of bf16 pairs), the W at
    /// even positions, then the W at odd ones. A uint of two bf16 values holds the even one in its low half (shifted up
    /// 16 it is that fp32) and the odd one in its high half (its low half masked off, it is that fp32): so the cache's
    /// rows need no shuffle, only a shift or an and per W values.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void ToPairOrder(float* x, float* pairs, int count)
    {
        int w = Vector<float>.Count;
        for (int block = 0; block < count; block += 2 * w)
            for (int j = 0; j < w; j++) { pairs[block + j] = x[block + 2 * j]; pairs[block + w + j] = x[block + 2 * j + 1]; }
    }

    /// <summary>The inverse of <see cref="ToPairOrder"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void FromPairOrder(float* pairs, float* x, int count)
    {
        int w = Vector<float>.Count;
        for (int block = 0; block < count; block += 2 * w)
            for (int j = 0; j < w; j++) { x[block + 2 * j] = pairs[block + j]; x[block + 2 * j + 1] = pairs[block + w + j]; }
    }

    /// <summary>The even-position bf16 of each pair as fp32.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector<float> EvenOf(Vector<uint> pairs) => Vector.AsVectorSingle(pairs << 16);

    /// <summary>The odd-position bf16 of each pair as fp32.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector<float> OddOf(Vector<uint> pairs) => Vector.AsVectorSingle(pairs & new Vector<uint>(0xFFFF0000u));

    /// <summary>
    /// <see cref="Scores"/> over bf16 keys read in place (half the bytes of fp32), q in pair order
    /// (<see cref="ToPairOrder"/>); hd a multiple of 2·W. Four keys at a time, two accumulators each (even and odd).
    /// At 2000 positions of the 1.1B shape this and <see cref="MixBf16"/> took attention from 5.2-6.8 to 4.7-4.9 ms per
    /// token, where widening each chunk into a buffer for the fp32 loops took 6.9-8.3 (2 threads, Zen 5, AVX2 vectors).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void ScoresBf16(float* q, ushort* k, int hd, int length, float scale, float* scores)
    {
        int w = Vector<float>.Count, p = 0;
        for (; p + 4 <= length; p += 4)
        {
            ushort* k0 = k + (long)p * hd, k1 = k0 + hd, k2 = k1 + hd, k3 = k2 + hd;
            Vector<float> a0 = default, a1 = default, a2 = default, a3 = default, b0 = default, b1 = default, b2 = default, b3 = default;
            for (int i = 0; i < hd; i += 2 * w)
            {
                var qe = Unsafe.ReadUnaligned<Vector<float>>(q + i);
                var qo = Unsafe.ReadUnaligned<Vector<float>>(q + i + w);
                var x0 = Unsafe.ReadUnaligned<Vector<uint>>(k0 + i); a0 = Vector.MultiplyAddEstimate(qe, EvenOf(x0), a0); b0 = Vector.MultiplyAddEstimate(qo, OddOf(x0), b0);
                var x1 = Unsafe.ReadUnaligned<Vector<uint>>(k1 + i); a1 = Vector.MultiplyAddEstimate(qe, EvenOf(x1), a1); b1 = Vector.MultiplyAddEstimate(qo, OddOf(x1), b1);
                var x2 = Unsafe.ReadUnaligned<Vector<uint>>(k2 + i); a2 = Vector.MultiplyAddEstimate(qe, EvenOf(x2), a2); b2 = Vector.MultiplyAddEstimate(qo, OddOf(x2), b2);
                var x3 = Unsafe.ReadUnaligned<Vector<uint>>(k3 + i); a3 = Vector.MultiplyAddEstimate(qe, EvenOf(x3), a3); b3 = Vector.MultiplyAddEstimate(qo, OddOf(x3), b3);
            }
            scores[p] = Vector.Sum(a0 + b0) * scale; scores[p + 1] = Vector.Sum(a1 + b1) * scale;
            scores[p + 2] = Vector.Sum(a2 + b2) * scale; scores[p + 3] = Vector.Sum(a3 + b3) * scale;
        }
        for (; p < length; p++)
        {
            ushort* kp = k + (long)p * hd;
            Vector<float> a = default, b = default;
            for (int i = 0; i < hd; i += 2 * w)
            {
                var x = Unsafe.ReadUnaligned<Vector<uint>>(kp + i);
                a = Vector.MultiplyAddEstimate(Unsafe.ReadUnaligned<Vector<float>>(q + i), EvenOf(x), a);
                b = Vector.MultiplyAddEstimate(Unsafe.ReadUnaligned<Vector<float>>(q + i + w), OddOf(x), b);
            }
            scores[p] = Vector.Sum(a + b) * scale;
        }
    }

    /// <summary>
    /// <see cref="Mix"/> over bf16 values read in place, o in pair order (<see cref="ToPairOrder"/>); hd a multiple of
    /// 2·W. Two pairs of vectors of o at a time (four accumulators), rows two by two: eight FMA chains, as in Mix.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void MixBf16(float* probs, ushort* v, int hd, int length, float* o)
    {
        int w = Vector<float>.Count, i = 0;
        for (; i + 4 * w <= hd; i += 4 * w)
        {
            Vector<float> a0 = default, a1 = default, a2 = default, a3 = default, b0 = default, b1 = default, b2 = default, b3 = default;
            ushort* r = v + i;
            int p = 0;
            for (; p + 2 <= length; p += 2, r += 2 * hd)
            {
                var pa = new Vector<float>(probs[p]);
                var pb = new Vector<float>(probs[p + 1]);
                var x0 = Unsafe.ReadUnaligned<Vector<uint>>(r); var x1 = Unsafe.ReadUnaligned<Vector<uint>>(r + 2 * w);
                var y0 = Unsafe.ReadUnaligned<Vector<uint>>(r + hd); var y1 = Unsafe.ReadUnaligned<Vector<uint>>(r + hd + 2 * w);
                a0 = Vector.MultiplyAddEstimate(pa, EvenOf(x0), a0); a1 = Vector.MultiplyAddEstimate(pa, OddOf(x0), a1);
                a2 = Vector.MultiplyAddEstimate(pa, EvenOf(x1), a2); a3 = Vector.MultiplyAddEstimate(pa, OddOf(x1), a3);
                b0 = Vector.MultiplyAddEstimate(pb, EvenOf(y0), b0); b1 = Vector.MultiplyAddEstimate(pb, OddOf(y0), b1);
                b2 = Vector.MultiplyAddEstimate(pb, EvenOf(y1), b2); b3 = Vector.MultiplyAddEstimate(pb, OddOf(y1), b3);
            }
            if (p < length)
            {
                var pa = new Vector<float>(probs[p]);
                var x0 = Unsafe.ReadUnaligned<Vector<uint>>(r); var x1 = Unsafe.ReadUnaligned<Vector<uint>>(r + 2 * w);
                a0 = Vector.MultiplyAddEstimate(pa, EvenOf(x0), a0); a1 = Vector.MultiplyAddEstimate(pa, OddOf(x0), a1);
                a2 = Vector.MultiplyAddEstimate(pa, EvenOf(x1), a2); a3 = Vector.MultiplyAddEstimate(pa, OddOf(x1), a3);
            }
            AddTo(o + i, a0 + b0); AddTo(o + i + w, a1 + b1); AddTo(o + i + 2 * w, a2 + b2); AddTo(o + i + 3 * w, a3 + b3);
        }
        for (; i < hd; i += 2 * w)
        {
            Vector<float> a0 = default, a1 = default;
            for (int p = 0; p < length; p++)
            {
                var pa = new Vector<float>(probs[p]);
                var x = Unsafe.ReadUnaligned<Vector<uint>>(v + (long)p * hd + i);
                a0 = Vector.MultiplyAddEstimate(pa, EvenOf(x), a0);
                a1 = Vector.MultiplyAddEstimate(pa, OddOf(x), a1);
            }
            AddTo(o + i, a0); AddTo(o + i + w, a1);
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
