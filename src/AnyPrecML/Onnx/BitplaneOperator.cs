using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using AnyPrecML.Kernels;
using AnyPrecML.Models;
using AnyPrecML.Quantization;
using Microsoft.ML.OnnxRuntime;

namespace AnyPrecML.Onnx;

/// <summary>
/// The <c>ai.anyprecml.BitplaneLinear</c> operator, written in C# and registered in ONNX Runtime through its C
/// function table (an <c>OrtCustomOp</c> of <c>[UnmanagedCallersOnly]</c> callbacks; no native shim). A node
/// names its layer in the <c>layer</c> attribute (or several, comma-separated, sharing x: q,k,v or gate,up, whose
/// outputs are concatenated; <c>activation = "swiglu"</c> turns gate,up into silu(gate)·up); its inputs are the
/// activations x [..., cols] (fp32) and the graph's <c>bits</c> (int32: one width, or one per linear of which each
/// layer reads its own: a precision profile), and its output is W_b·x [..., rows]. Each kernel looks its layer up in an
/// <see cref="AnyPrecisionModel"/>, so the bitplanes stay where the model mapped them: one copy however many
/// sessions or widths use them. Exceptions never cross into native code: they become ORT error statuses,
/// which ONNX Runtime raises as <see cref="OnnxRuntimeException"/> with the message.
/// The same domain holds <c>ai.anyprecml.Int8Linear</c>, the LM head at the int8 level: its <c>weight</c> attribute
/// names a float tensor of the model's checkpoint (the head, or the embedding when tied), quantized once per model
/// into an <see cref="Int8Matrix"/>; its one input is x [..., cols] and its output W·x [..., rows]. And
/// <c>ai.anyprecml.Attention</c>, the CPU engine's attention (<see cref="CausalAttention"/>): inputs q,k,v packed
/// [1, S, (heads + 2·kv_heads)·head_dim], the past key and value [1, kv_heads, capacity, head_dim] (the new rows are
/// written into them: the engine's cache), seqlens_k [1] and total_sequence_length (int32, as GroupQueryAttention takes
/// them), the RoPE cos and sin tables [positions, head_dim/2] and batch_caches (int64 [B]: empty, or for a decode
/// step of B sequences the ids of the caches lent by <see cref="LendCaches"/>, token i appended to cache i at its own
/// position); output the attention [1, S, heads·head_dim]. Its attribute <c>layer</c> says which of a lent cache's
/// layers it reads.
/// </summary>
public sealed unsafe class BitplaneOperator : IDisposable
{
    /// <summary>The custom operator domain of the exported graphs.</summary>
    public const string Domain = "ai.anyprecml";
    /// <summary>The operator's type name.</summary>
    public const string OpType = "BitplaneLinear";
    /// <summary>The int8 dense linear's type name (the LM head at the int8 level).</summary>
    public const string Int8OpType = "Int8Linear";
    /// <summary>The CPU engine's attention's type name.</summary>
    public const string AttentionOpType = "Attention";

    private static readonly byte* OpName = Utf8(OpType), Int8OpName = Utf8(Int8OpType), AttentionOpName = Utf8(AttentionOpType);
    private static readonly byte* CpuProvider = Utf8("CPUExecutionProvider");
    // One int8 copy of a model's head however many engines serve it.
    private static readonly ConditionalWeakTable<AnyPrecisionModel, Dictionary<string, Int8Matrix>> Int8Heads = new();

    private readonly OpBlock* _op, _int8Op, _attentionOp;
    // Caches lent to the Attention nodes for one batched call, by id (see LendCaches).
    private readonly System.Collections.Concurrent.ConcurrentDictionary<long, OnnxKvCache> _lent = new();
    private GCHandle _self;
    private void* _domain;

    /// <summary>An operator whose kernels run layers of <paramref name="model"/> on <paramref name="backend"/> (default: <see cref="BitplaneBackend.Default"/>).</summary>
    public BitplaneOperator(AnyPrecisionModel model, BitplaneBackend? backend = null)
    {
        Model = model ?? throw new ArgumentNullException(nameof(model));
        Backend = backend ?? BitplaneBackend.Default;
        _self = GCHandle.Alloc(this);
        _op = NewOp(GCHandle.ToIntPtr(_self), OpKind.Bitplane);
        _int8Op = NewOp(GCHandle.ToIntPtr(_self), OpKind.Int8);
        _attentionOp = NewOp(GCHandle.ToIntPtr(_self), OpKind.Attention);
        _domain = OrtApiTable.CreateCustomOpDomain(Domain);
        OrtApiTable.CustomOpDomainAdd(_domain, _op);
        OrtApiTable.CustomOpDomainAdd(_domain, _int8Op);
        OrtApiTable.CustomOpDomainAdd(_domain, _attentionOp);
    }

    private static OpBlock* NewOp(nint owner, OpKind kind)
    {
        var block = (OpBlock*)NativeMemory.AllocZeroed((nuint)sizeof(OpBlock));
        block->Owner = owner;
        block->Kind = kind;
        ref var op = ref block->Op;
        op.Version = OrtApiTable.ApiVersion;
        op.CreateKernel = &CreateKernelV1;
        op.GetName = &GetName;
        op.GetExecutionProviderType = &GetExecutionProviderType;
        op.GetInputType = &GetInputType;
        op.GetInputTypeCount = &GetInputTypeCount;
        op.GetOutputType = &GetOutputType;
        op.GetOutputTypeCount = &GetOutputTypeCount;
        op.KernelCompute = &KernelComputeV1;
        op.KernelDestroy = &KernelDestroy;
        op.GetInputCharacteristic = &Required;
        op.GetOutputCharacteristic = &Required;
        op.GetInputMemoryType = &InputMemoryType;
        op.GetVariadicInputMinArity = &One;
        op.GetVariadicInputHomogeneity = &One;
        op.GetVariadicOutputMinArity = &One;
        op.GetVariadicOutputHomogeneity = &One;
        op.CreateKernelV2 = &CreateKernelV2;
        op.KernelComputeV2 = &KernelComputeV2;
        op.GetStartVersion = &StartVersion;
        op.GetEndVersion = &EndVersion;
        return block;
    }

    /// <summary>The model whose layers the kernels run.</summary>
    public AnyPrecisionModel Model { get; }

    /// <summary>Where the products run.</summary>
    public BitplaneBackend Backend { get; }

    /// <summary>Kernel calls so far (all sessions); with <see cref="KernelTicks"/> it separates kernel time from ORT's.</summary>
    public long KernelCalls => Interlocked.Read(ref _calls);

    /// <summary>Stopwatch ticks spent inside <see cref="BitplaneBackend.Multiply(IReadOnlyList{BitplaneMatrix}, ReadOnlySpan{int}, ReadOnlySpan{float}, int, Span{float})"/> so far.</summary>
    public long KernelTicks => Interlocked.Read(ref _ticks);

    /// <summary>Stopwatch ticks spent in <see cref="Int8OpType"/> products (the int8 head) so far.</summary>
    public long HeadTicks => Interlocked.Read(ref _headTicks);

    /// <summary>Stopwatch ticks spent in <see cref="AttentionOpType"/> nodes (<see cref="CausalAttention"/>) so far.</summary>
    public long AttentionTicks => Interlocked.Read(ref _attentionTicks);

    private long _calls, _ticks, _headTicks, _attentionTicks;
    private CpuBitplaneBackend? _cpu;

    /// <summary>The backend of the int8 head: <see cref="Backend"/> when it is the CPU's, else a CPU backend of its own.</summary>
    private CpuBitplaneBackend Cpu => Backend as CpuBitplaneBackend ?? LazyInitializer.EnsureInitialized(ref _cpu, () => new CpuBitplaneBackend());

    /// <summary>The int8 copy of the checkpoint tensor <paramref name="name"/>, made on first use and shared per model.</summary>
    private Int8Matrix Int8Head(string name)
    {
        var heads = Int8Heads.GetValue(Model, _ => new Dictionary<string, Int8Matrix>());
        lock (heads)
        {
            if (heads.TryGetValue(name, out var head)) return head;
            if (!Model.Checkpoint.Contains(name)) throw new ArgumentException($"{Int8OpType}: the model has no tensor '{name}'.");
            var t = Model.Checkpoint[name];
            if (t.Shape.Count != 2) throw new ArgumentException($"{Int8OpType}: '{name}' has {t.Shape.Count} dimensions, not 2.");
            return heads[name] = Int8Matrix.Quantize(t);
        }
    }

    /// <summary>
    /// A session of <paramref name="model"/> (ONNX bytes) with this operator's domain added to <paramref name="options"/>;
    /// keep this object alive while the session runs. Sessions with the domain are created one at a time in a process:
    /// two created at once (two test classes opening engines in parallel) failed in ONNX Runtime with "Trying to add a
    /// domain to DomainToVersion map, but the domain is already exist", as creating one registers the domain's schema
    /// in a map the whole process shares.
    /// </summary>
    public InferenceSession CreateSession(byte[] model, SessionOptions options) => CreateSession(options, () => new InferenceSession(model, options));

    /// <summary>As <see cref="CreateSession(byte[], SessionOptions)"/>, from an ONNX file.</summary>
    public InferenceSession CreateSession(string modelPath, SessionOptions options) => CreateSession(options, () => new InferenceSession(modelPath, options));

    private static readonly Lock SessionCreation = new();

    private InferenceSession CreateSession(SessionOptions options, Func<InferenceSession> create)
    {
        ArgumentNullException.ThrowIfNull(options);
        ObjectDisposedException.ThrowIf(_domain == null, this);
        OrtApiTable.AddCustomOpDomain(options.DangerousGetHandle(), _domain);
        lock (SessionCreation) return create();
    }

    /// <summary>Releases the domain and the native operator; call after every session using them is disposed.</summary>
    public void Dispose()
    {
        if (_domain == null) return;
        OrtApiTable.ReleaseCustomOpDomain(_domain);
        _domain = null;
        NativeMemory.Free(_op);
        NativeMemory.Free(_int8Op);
        NativeMemory.Free(_attentionOp);
        _self.Free();
    }

    /// <summary>A node's kernel, resolved once when the session is created.</summary>
    private abstract class Kernel
    {
        public abstract void Compute(void* context);

        /// <summary>x's data and token count, after checking that its last dimension is <paramref name="cols"/>; dims becomes y's shape.</summary>
        protected static ReadOnlySpan<float> Input(void* context, string name, int cols, int rows, Span<long> dims, out int rank, out long tokens)
        {
            void* xv = OrtApiTable.KernelInput(context, 0);
            rank = OrtApiTable.Shape(xv, dims);
            if (rank == 0 || dims[rank - 1] != cols)
                throw new ArgumentException($"{name}: input of shape [{string.Join(", ", dims[..rank].ToArray())}] does not end in its {cols} columns.");
            tokens = 1;
            for (int i = 0; i < rank - 1; i++) tokens *= dims[i];
            dims[rank - 1] = rows;
            return new ReadOnlySpan<float>(OrtApiTable.TensorData(xv), checked((int)(tokens * cols)));
        }
    }

    /// <summary>The int8 head: y = W·x through <see cref="CpuBitplaneBackend.Multiply(Int8Matrix, ReadOnlySpan{float}, int, Span{float})"/>.</summary>
    private sealed class Int8Kernel(BitplaneOperator owner, Int8Matrix weight) : Kernel
    {
        public override void Compute(void* context)
        {
            Span<long> dims = stackalloc long[8];
            var x = Input(context, weight.Name, weight.Cols, weight.Rows, dims, out int rank, out long tokens);
            void* yv = OrtApiTable.KernelOutput(context, 0, dims[..rank]);
            if (tokens == 0) return;
            var y = new Span<float>(OrtApiTable.TensorData(yv), checked((int)(tokens * weight.Rows)));
            long start = System.Diagnostics.Stopwatch.GetTimestamp();
            owner.Cpu.Multiply(weight, x, (int)tokens, y);
            Interlocked.Add(ref owner._headTicks, System.Diagnostics.Stopwatch.GetTimestamp() - start);
        }
    }

    /// <summary>
    /// One node's kernel: its matrices (one, or several sharing x, whose outputs are concatenated), and with
    /// <c>activation = "swiglu"</c> (two matrices, gate then up) the output silu(gate)·up instead of both.
    /// </summary>
    private sealed class BitplaneKernel(BitplaneOperator owner, BitplaneMatrix[] weights, int[] indices, bool swiglu) : Kernel
    {
        private readonly int _rows = weights.Sum(w => w.Rows), _cols = weights[0].Cols;
        private readonly string _name = string.Join(",", weights.Select(w => w.Name));
        [ThreadStatic] private static float[]? t_both; // sessions may run concurrently: a buffer per calling thread

        public override void Compute(void* context)
        {
            void* bv = OrtApiTable.KernelInput(context, 1);
            Span<long> dims = stackalloc long[8];
            int outRows = swiglu ? weights[0].Rows : _rows;
            var x = Input(context, _name, _cols, outRows, dims, out int rank, out long tokens);
            Span<long> bitsDims = stackalloc long[8];
            long bitsCount = 1;
            foreach (long d in bitsDims[..OrtApiTable.Shape(bv, bitsDims)]) bitsCount *= d;
            // One width for every linear, or one per linear (a precision profile), of which each layer reads its own.
            if (bitsCount != 1 && bitsCount != owner.Model.LinearCount)
                throw new ArgumentException($"{_name}: 'bits' must hold one int32 or one per linear ({owner.Model.LinearCount}), not {bitsCount} values.");
            int* all = (int*)OrtApiTable.TensorData(bv);
            Span<int> widths = stackalloc int[weights.Length];
            for (int i = 0; i < weights.Length; i++)
            {
                int b = widths[i] = all[bitsCount == 1 ? 0 : indices[i]];
                if (b < weights[0].SeedBits || b > weights[0].ParentBits)
                    throw new ArgumentOutOfRangeException("bits", b, $"bits {b} is outside this model's {weights[0].SeedBits}..{weights[0].ParentBits}.");
            }
            void* yv = OrtApiTable.KernelOutput(context, 0, dims[..rank]);
            if (tokens == 0) return;
            int m = checked((int)tokens);
            var y = new Span<float>(OrtApiTable.TensorData(yv), checked(m * outRows));
            long start = System.Diagnostics.Stopwatch.GetTimestamp();
            if (!swiglu) owner.Backend.Multiply(weights, widths, x, m, y);
            else
            {
                if (t_both is null || t_both.Length < m * _rows) t_both = new float[m * _rows];
                var both = t_both.AsSpan(0, m * _rows);
                owner.Backend.Multiply(weights, widths, x, m, both);
                int h = outRows;
                for (int t = 0; t < m; t++)
                {
                    // Token by token, so each token's values go through the same vector lanes whatever m is.
                    var gate = both.Slice(t * _rows, h);
                    var up = both.Slice(t * _rows + h, h);
                    var o = y.Slice(t * h, h);
                    TensorPrimitives.Sigmoid(gate, o);
                    TensorPrimitives.Multiply(o, gate, o);
                    TensorPrimitives.Multiply(o, up, o);
                }
            }
            Interlocked.Add(ref owner._ticks, System.Diagnostics.Stopwatch.GetTimestamp() - start);
            Interlocked.Increment(ref owner._calls);
        }
    }

    /// <summary>One layer's attention on the CPU: <see cref="CausalAttention.Run"/>, appending to the past key and value in place.</summary>
    private sealed class AttentionKernel(BitplaneOperator owner, CausalAttention.Shape shape, int layer) : Kernel
    {
        private readonly float _scale = 1f / MathF.Sqrt(shape.HeadDim);

        public override void Compute(void* context)
        {
            Span<long> dims = stackalloc long[8], cache = stackalloc long[8], rope = stackalloc long[8];
            void* qkv = OrtApiTable.KernelInput(context, 0);
            int qRank = OrtApiTable.Shape(qkv, dims);
            if (qRank != 3 || dims[0] != 1 || dims[2] != shape.PackedWidth)
                throw new ArgumentException($"{AttentionOpType}: q,k,v of shape [{string.Join(", ", dims[..qRank].ToArray())}]; [1, S, {shape.PackedWidth}] expected.");
            int tokens = checked((int)dims[1]);
            void* pastKey = OrtApiTable.KernelInput(context, 1), pastValue = OrtApiTable.KernelInput(context, 2);
            int rank = OrtApiTable.Shape(pastKey, cache, out int keyType);
            if (rank != 4 || cache[0] != 1 || cache[1] != shape.KvHeads || cache[3] != shape.HeadDim)
                throw new ArgumentException($"{AttentionOpType}: past key of shape [{string.Join(", ", cache[..rank].ToArray())}]; [1, {shape.KvHeads}, capacity, {shape.HeadDim}] expected.");
            Span<long> valueDims = stackalloc long[8];
            int valueRank = OrtApiTable.Shape(pastValue, valueDims, out int valueType);
            // The cache inputs take any element type (see GetInputType): fp32 or bf16, the same for keys and values.
            if (keyType is not (ElementFloat or ElementBFloat16) || valueType != keyType || !valueDims[..valueRank].SequenceEqual(cache[..rank]))
                throw new ArgumentException($"{AttentionOpType}: past key and value must be fp32 or bf16 tensors of one type and shape.");
            var cacheType = keyType == ElementBFloat16 ? KvCacheType.BFloat16 : KvCacheType.Float32;
            int total = *(int*)OrtApiTable.TensorData(OrtApiTable.KernelInput(context, 4));
            if (*(int*)OrtApiTable.TensorData(OrtApiTable.KernelInput(context, 3)) != total - 1)
                throw new ArgumentException($"{AttentionOpType}: seqlens_k must be total_sequence_length - 1.");
            void* cosV = OrtApiTable.KernelInput(context, 5), sinV = OrtApiTable.KernelInput(context, 6);
            OrtApiTable.Shape(cosV, rope);
            var cos = new ReadOnlySpan<float>(OrtApiTable.TensorData(cosV), checked((int)(rope[0] * rope[1])));
            var sin = new ReadOnlySpan<float>(OrtApiTable.TensorData(sinV), cos.Length);
            dims[2] = shape.Heads * shape.HeadDim;
            var output = new Span<float>(OrtApiTable.TensorData(OrtApiTable.KernelOutput(context, 0, dims[..3])), tokens * (int)dims[2]);
            if (tokens == 0) return;
            var input = new ReadOnlySpan<float>(OrtApiTable.TensorData(qkv), tokens * shape.PackedWidth);
            void* batchValue = OrtApiTable.KernelInput(context, 7);
            int batch = OrtApiTable.Shape(batchValue, rope) == 1 ? checked((int)rope[0]) : -1;
            if (batch < 0) throw new ArgumentException($"{AttentionOpType}: batch_caches must be int64 [B].");
            long start = System.Diagnostics.Stopwatch.GetTimestamp();
            if (batch == 0)
                CausalAttention.Run(shape, input, tokens, cacheType, OrtApiTable.TensorData(pastKey), OrtApiTable.TensorData(pastValue), checked((int)cache[2]),
                    total - tokens, cos, sin, _scale, output, owner.Cpu.Pool);
            else
            {
                // One decode step of several sequences: token i goes to lent cache i, at that cache's own position.
                if (batch != tokens) throw new ArgumentException($"{AttentionOpType}: {batch} batch caches for {tokens} tokens; one token per sequence.");
                var ids = new ReadOnlySpan<long>(OrtApiTable.TensorData(batchValue), batch);
                int packed = shape.PackedWidth, width = shape.Heads * shape.HeadDim;
                for (int i = 0; i < batch; i++)
                {
                    if (!owner._lent.TryGetValue(ids[i], out var kv)) throw new ArgumentException($"{AttentionOpType}: batch cache {ids[i]} was not lent for this call.");
                    CausalAttention.Run(shape, input.Slice(i * packed, packed), 1, kv.Type, kv.Data(2 * layer), kv.Data(2 * layer + 1), kv.Capacity,
                        kv.Length, cos, sin, _scale, output.Slice(i * width, width), owner.Cpu.Pool);
                }
            }
            Interlocked.Add(ref owner._attentionTicks, System.Diagnostics.Stopwatch.GetTimestamp() - start);
        }
    }

    /// <summary>
    /// Lends <paramref name="caches"/> to the Attention nodes until the returned lease is disposed: a batched call's
    /// batch_caches input names them by <see cref="OnnxKvCache.Id"/>. A cache already lent (to a call still running) is refused.
    /// </summary>
    internal IDisposable LendCaches(IReadOnlyList<OnnxKvCache> caches)
    {
        var lease = new CacheLease(this, caches.Count);
        foreach (var cache in caches)
        {
            if (!_lent.TryAdd(cache.Id, cache))
            {
                lease.Dispose();
                throw new InvalidOperationException("a cache is already in a running batched call: each sequence's steps run one at a time.");
            }
            lease.Ids.Add(cache.Id);
        }
        return lease;
    }

    private sealed class CacheLease(BitplaneOperator owner, int count) : IDisposable
    {
        public readonly List<long> Ids = new(count);

        public void Dispose()
        {
            foreach (long id in Ids) owner._lent.TryRemove(id, out _);
            Ids.Clear();
        }
    }

    private static BitplaneOperator Owner(OrtCustomOp* op) => (BitplaneOperator)GCHandle.FromIntPtr(((OpBlock*)op)->Owner).Target!;

    private static Kernel NewKernel(OrtCustomOp* op, void* info)
    {
        var owner = Owner(op);
        if (((OpBlock*)op)->Kind == OpKind.Attention)
        {
            var c = owner.Model.Config;
            long heads = OrtApiTable.KernelInfoInt64(info, "num_heads") ?? 0, kvHeads = OrtApiTable.KernelInfoInt64(info, "kv_num_heads") ?? 0;
            if (heads != c.Heads || kvHeads != c.KvHeads)
                throw new ArgumentException($"{AttentionOpType} node has {heads} heads over {kvHeads}; the model has {c.Heads} over {c.KvHeads}.");
            long attentionLayer = OrtApiTable.KernelInfoInt64(info, "layer") ?? -1;
            if (attentionLayer < 0 || attentionLayer >= c.Layers) throw new ArgumentException($"{AttentionOpType} node's layer attribute is {attentionLayer}; the model has layers 0..{c.Layers - 1}.");
            return new AttentionKernel(owner, new CausalAttention.Shape(c.Heads, c.KvHeads, c.HeadDim, OrtApiTable.KernelInfoInt64(info, "interleaved") == 1), (int)attentionLayer);
        }
        if (((OpBlock*)op)->Kind == OpKind.Int8)
        {
            string tensor = OrtApiTable.KernelInfoString(info, "weight")
                ?? throw new ArgumentException($"an {Int8OpType} node has no 'weight' attribute naming its tensor.");
            var head = owner.Int8Head(tensor);
            if (OrtApiTable.KernelInfoInt64(info, "rows") is long hr && hr != head.Rows || OrtApiTable.KernelInfoInt64(info, "cols") is long hc && hc != head.Cols)
                throw new ArgumentException($"{Int8OpType} node for '{tensor}' expects [{OrtApiTable.KernelInfoInt64(info, "rows")}, {OrtApiTable.KernelInfoInt64(info, "cols")}]; the tensor is [{head.Rows}, {head.Cols}].");
            return new Int8Kernel(owner, head);
        }
        string layer = OrtApiTable.KernelInfoString(info, "layer")
            ?? throw new ArgumentException($"a {OpType} node has no 'layer' attribute naming its weight.");
        var weights = new List<BitplaneMatrix>();
        var indices = new List<int>();
        foreach (string name in layer.Split(','))
        {
            try { indices.Add(owner.Model.LinearIndex(name)); weights.Add(owner.Model.Linear(indices[^1])); }
            catch (Exception e) when (e is KeyNotFoundException or ArgumentException)
            {
                throw new ArgumentException($"{OpType}: unknown layer '{name}': the any-precision model has no such quantized linear.", e);
            }
        }
        if (weights.Any(w => w.Cols != weights[0].Cols))
            throw new ArgumentException($"{OpType} node for '{layer}': fused layers must share their columns ({string.Join(", ", weights.Select(w => w.Cols))}).");
        string activation = OrtApiTable.KernelInfoString(info, "activation") ?? "";
        bool swiglu = activation switch
        {
            "" => false,
            "swiglu" when weights.Count == 2 && weights[0].Rows == weights[1].Rows => true,
            "swiglu" => throw new ArgumentException($"{OpType} node for '{layer}': swiglu needs two layers (gate, up) of equal rows."),
            _ => throw new ArgumentException($"{OpType} node for '{layer}': unknown activation '{activation}' (none or swiglu)."),
        };
        // The exporter records the node's shape: a graph written for another model fails here, not mid-run.
        int rowsAll = weights.Sum(w => w.Rows);
        if (OrtApiTable.KernelInfoInt64(info, "rows") is long rows && rows != rowsAll
            || OrtApiTable.KernelInfoInt64(info, "cols") is long cols && cols != weights[0].Cols)
            throw new ArgumentException($"{OpType} node for '{layer}' expects [{OrtApiTable.KernelInfoInt64(info, "rows")}, {OrtApiTable.KernelInfoInt64(info, "cols")}]; the model's layers are [{rowsAll}, {weights[0].Cols}].");
        return new BitplaneKernel(owner, [.. weights], [.. indices], swiglu);
    }

    [UnmanagedCallersOnly]
    private static void* CreateKernelV2(OrtCustomOp* op, void* api, void* info, void** kernel)
    {
        try
        {
            *kernel = (void*)GCHandle.ToIntPtr(GCHandle.Alloc(NewKernel(op, info)));
            return null;
        }
        catch (Exception e) { *kernel = null; return OrtApiTable.CreateStatus(OrtApiTable.OrtInvalidArgument, e.Message); }
    }

    [UnmanagedCallersOnly]
    private static void* KernelComputeV2(void* kernel, void* context)
    {
        try
        {
            ((Kernel)GCHandle.FromIntPtr((nint)kernel).Target!).Compute(context);
            return null;
        }
        catch (Exception e)
        {
            int code = e is ArgumentException ? OrtApiTable.OrtInvalidArgument : OrtApiTable.OrtFail;
            return OrtApiTable.CreateStatus(code, e.Message);
        }
    }

    // The version-1 entry points only run on runtimes that ignore the V2 ones (older than this library
    // supports); they exist so the struct is complete, and cannot report errors, so they log and give up.
    [UnmanagedCallersOnly]
    private static void* CreateKernelV1(OrtCustomOp* op, void* api, void* info)
    {
        try { return (void*)GCHandle.ToIntPtr(GCHandle.Alloc(NewKernel(op, info))); }
        catch (Exception e) { Console.Error.WriteLine($"AnyPrecML: {e.Message}"); return null; }
    }

    [UnmanagedCallersOnly]
    private static void KernelComputeV1(void* kernel, void* context)
    {
        try { ((Kernel)GCHandle.FromIntPtr((nint)kernel).Target!).Compute(context); }
        catch (Exception e) { Console.Error.WriteLine($"AnyPrecML: {e.Message}"); }
    }

    [UnmanagedCallersOnly]
    private static void KernelDestroy(void* kernel)
    {
        if (kernel != null) GCHandle.FromIntPtr((nint)kernel).Free();
    }

    private static OpKind KindOf(OrtCustomOp* op) => ((OpBlock*)op)->Kind;

    [UnmanagedCallersOnly] private static byte* GetName(OrtCustomOp* op) => KindOf(op) switch { OpKind.Int8 => Int8OpName, OpKind.Attention => AttentionOpName, _ => OpName };
    [UnmanagedCallersOnly] private static byte* GetExecutionProviderType(OrtCustomOp* op) => CpuProvider;
    // ONNXTensorElementDataType: 1 = float, 6 = int32 (bits; attention's seqlens_k and total_sequence_length), 7 = int64
    // (attention's batch_caches), 0 = any
    // type (attention's past key and value: fp32 or bf16, which the kernel reads from the tensors and checks).
    private const int ElementFloat = 1, ElementInt64 = 7, ElementBFloat16 = 16;
    [UnmanagedCallersOnly]
    private static int GetInputType(OrtCustomOp* op, nuint index) => KindOf(op) == OpKind.Attention ? index switch { 1 or 2 => 0, 3 or 4 => 6, 7 => ElementInt64, _ => ElementFloat } : index == 0 ? ElementFloat : 6;
    [UnmanagedCallersOnly] private static nuint GetInputTypeCount(OrtCustomOp* op) => KindOf(op) switch { OpKind.Int8 => 1u, OpKind.Attention => 8u, _ => 2u };
    [UnmanagedCallersOnly] private static int GetOutputType(OrtCustomOp* op, nuint index) => 1;
    [UnmanagedCallersOnly] private static nuint GetOutputTypeCount(OrtCustomOp* op) => 1;
    [UnmanagedCallersOnly] private static int Required(OrtCustomOp* op, nuint index) => 0; // INPUT_OUTPUT_REQUIRED
    // 'bits' is read by the host: ask for it in CPU memory (OrtMemTypeCPUInput) even under another provider.
    [UnmanagedCallersOnly] private static int InputMemoryType(OrtCustomOp* op, nuint index) => KindOf(op) == OpKind.Bitplane && index == 1 ? -2 : 0;
    [UnmanagedCallersOnly] private static int One(OrtCustomOp* op) => 1;
    [UnmanagedCallersOnly] private static int StartVersion(OrtCustomOp* op) => 1;
    [UnmanagedCallersOnly] private static int EndVersion(OrtCustomOp* op) => int.MaxValue;

    private static byte* Utf8(string s)
    {
        var bytes = System.Text.Encoding.UTF8.GetBytes(s + "\0");
        var p = (byte*)NativeMemory.Alloc((nuint)bytes.Length); // lives for the process, as ORT may ask at any time
        bytes.CopyTo(new Span<byte>(p, bytes.Length));
        return p;
    }

    /// <summary>OrtCustomOp as onnxruntime_c_api.h lays it out (fields up to API version 20).</summary>
    [StructLayout(LayoutKind.Sequential)]
    private struct OrtCustomOp
    {
        public uint Version;
        public delegate* unmanaged<OrtCustomOp*, void*, void*, void*> CreateKernel;
        public delegate* unmanaged<OrtCustomOp*, byte*> GetName;
        public delegate* unmanaged<OrtCustomOp*, byte*> GetExecutionProviderType;
        public delegate* unmanaged<OrtCustomOp*, nuint, int> GetInputType;
        public delegate* unmanaged<OrtCustomOp*, nuint> GetInputTypeCount;
        public delegate* unmanaged<OrtCustomOp*, nuint, int> GetOutputType;
        public delegate* unmanaged<OrtCustomOp*, nuint> GetOutputTypeCount;
        public delegate* unmanaged<void*, void*, void> KernelCompute;
        public delegate* unmanaged<void*, void> KernelDestroy;
        public delegate* unmanaged<OrtCustomOp*, nuint, int> GetInputCharacteristic;
        public delegate* unmanaged<OrtCustomOp*, nuint, int> GetOutputCharacteristic;
        public delegate* unmanaged<OrtCustomOp*, nuint, int> GetInputMemoryType;
        public delegate* unmanaged<OrtCustomOp*, int> GetVariadicInputMinArity;
        public delegate* unmanaged<OrtCustomOp*, int> GetVariadicInputHomogeneity;
        public delegate* unmanaged<OrtCustomOp*, int> GetVariadicOutputMinArity;
        public delegate* unmanaged<OrtCustomOp*, int> GetVariadicOutputHomogeneity;
        public delegate* unmanaged<OrtCustomOp*, void*, void*, void**, void*> CreateKernelV2;
        public delegate* unmanaged<void*, void*, void*> KernelComputeV2;
        public void* InferOutputShapeFn;
        public delegate* unmanaged<OrtCustomOp*, int> GetStartVersion;
        public delegate* unmanaged<OrtCustomOp*, int> GetEndVersion;
        public void* GetMayInplace, ReleaseMayInplace, GetAliasMap, ReleaseAliasMap;
    }

    private enum OpKind { Bitplane, Int8, Attention }

    /// <summary>The struct ORT sees, followed by the handle of the managed operator it belongs to and which op it is.</summary>
    [StructLayout(LayoutKind.Sequential)]
    private struct OpBlock
    {
        public OrtCustomOp Op;
        public nint Owner;
        public OpKind Kind;
    }
}
