using AnyPrecML.Kernels;
using AnyPrecML.Models;
using AnyPrecML.Quantization;
using Microsoft.ML.OnnxRuntime;
using Microsoft.ML.OnnxRuntime.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace AnyPrecML.Onnx;

/// <summary>Settings of an <see cref="OnnxEngine"/>.</summary>
public sealed class OnnxEngineOptions
{
    /// <summary>Width used by <see cref="IInferenceEngine.Forward"/> until changed (default: the parent width).</summary>
    public int? Bits { get; set; }
    /// <summary>Where the bitplane products run (default: <see cref="BitplaneBackend.Default"/>).</summary>
    public BitplaneBackend? Backend { get; set; }
    /// <summary>ONNX Runtime intra-op threads for the non-linear operators (default: one per core).</summary>
    public int IntraOpThreads { get; set; }
    /// <summary>A graph written earlier by <see cref="DecoderGraph.Save"/>; null exports one in memory.</summary>
    public string? GraphPath { get; set; }
    /// <summary>Where ONNX Runtime runs the non-bitplane operators (default: <see cref="OnnxDevice.Auto"/>).</summary>
    public OnnxDevice Device { get; set; }
    /// <summary>
    /// What the CPU attention's caches hold (default: <see cref="KvCacheType.BFloat16"/>, as llama.cpp keeps a 16-bit
    /// cache: half the memory per sequence and half the bytes each step reads). ONNX Runtime's GroupQueryAttention (CUDA,
    /// or a graph given by <see cref="GraphPath"/>) keeps fp32, and asking it for bf16 is an error.
    /// </summary>
    public KvCacheType? KvCacheType { get; set; }
}

/// <summary>The execution provider choice of an <see cref="OnnxEngine"/>.</summary>
public enum OnnxDevice
{
    /// <summary>CUDA when this build's ONNX Runtime has the provider and it loads; otherwise the CPU, with <see cref="OnnxEngine.DeviceFallback"/> saying why when CUDA was there but failed.</summary>
    Auto,
    /// <summary>The CPU provider only.</summary>
    Cpu,
    /// <summary>CUDA or an error naming why it cannot be used.</summary>
    Cuda,
}

/// <summary>
/// The any-precision engine: the decoder graph (<see cref="DecoderGraph"/>) in one ONNX Runtime session, with the
/// quantized linears run by <see cref="BitplaneOperator"/> on the model's mapped bitplanes, and the embedding table read where
/// the model's file is mapped too. The width is chosen per
/// call (<see cref="Bits"/>, or the <c>bits</c> argument of <see cref="Forward(ReadOnlySpan{int}, KvCache, Span{float}, int)"/>),
/// so one session and one copy of the weights serve every b. Same contract as the reference engine.
/// </summary>
public sealed unsafe class OnnxEngine : IAnyPrecisionEngine
{
    private readonly AnyPrecisionModel _model;
    private readonly BitplaneOperator _op;
    private readonly InferenceSession _session;
    private readonly RunOptions _run = new();
    private OrtValue? _embedding; // the embedding table over the mapped model file, given to the session in place of the graph's reference
    private readonly string[] _inputNames, _outputNames, _logitsOnly = [DecoderGraph.Logits];
    private int _bits;

    /// <summary>An engine over <paramref name="model"/> (kept open by the caller for the engine's lifetime).</summary>
    /// <exception cref="OnnxRuntimeException">The graph is malformed or names a layer the model lacks.</exception>
    public OnnxEngine(AnyPrecisionModel model, OnnxEngineOptions? options = null)
    {
        _model = model ?? throw new ArgumentNullException(nameof(model));
        options ??= new OnnxEngineOptions();
        _bits = model.CheckBits(options.Bits ?? model.ParentBits);
        _op = new BitplaneOperator(model, options.Backend);
        try
        {
            // The int8 level on the CPU runs the head in int8 too; on CUDA the fp32 Gemm stays with the provider.
            bool int8Cpu = _op.Backend is CpuBitplaneBackend { Accuracy: KernelAccuracy.Int8 };
            InferenceSession Session(bool cuda)
            {
                Int8Head = options.GraphPath is null && int8Cpu && !cuda;
                InPlaceAttention = options.GraphPath is null && !cuda;
                if (!InPlaceAttention && options.KvCacheType == Models.KvCacheType.BFloat16)
                    throw new NotSupportedException($"a bf16 key/value cache needs the CPU attention; {(cuda ? "under CUDA" : "with a graph file")} GroupQueryAttention keeps fp32 (ask for an fp32 cache{(cuda ? ", or the CPU device" : "")}).");
                KvCacheType = InPlaceAttention ? options.KvCacheType ?? Models.KvCacheType.BFloat16 : Models.KvCacheType.Float32;
                byte[]? graph = options.GraphPath is null ? Google.Protobuf.MessageExtensions.ToByteArray(DecoderGraph.Export(model, Int8Head, InPlaceAttention, embeddingByReference: true, KvCacheType)) : null;
                using var so = new SessionOptions { GraphOptimizationLevel = GraphOptimizationLevel.ORT_ENABLE_ALL, InterOpNumThreads = 1 };
                if (graph is not null && DecoderGraph.StoredEmbeddingType(model, Int8Head) is { } stored)
                {
                    // The graph's embedding initializer is a reference: the session reads the table where the model's file
                    // is mapped (file-backed pages, only the rows in use resident), as the bitplane kernels read the planes.
                    var view = model.Checkpoint[LlamaTensorNames.Embedding];
                    _embedding?.Dispose();
                    // ONNX Runtime's element types are numbered as ONNX's data types.
                    fixed (byte* table = view.Bytes) // the mapping does not move: the pointer stays valid while the model is open
                        _embedding = OrtValue.CreateTensorValueWithData(OrtMemoryInfo.DefaultInstance, (TensorElementType)(int)stored, [.. view.Shape], (nint)table, view.ByteLength);
                    so.AddInitializer(LlamaTensorNames.Embedding, _embedding);
                    // The reference must name an existing file where ONNX Runtime looks (it checks before it takes the table given).
                    so.AddSessionConfigEntry("session.model_external_initializers_file_folder_path", Path.GetDirectoryName(view.FilePath)!);
                }
                if (options.IntraOpThreads > 0) so.IntraOpNumThreads = options.IntraOpThreads;
                // The bitplane kernels have their own pool: ORT's idle threads spinning beside it tripled kernel time
                // (stories110M shape, 3 bits: 60.8 tok/s without spinning, 25.2 with; docs/BENCHMARKS.md).
                so.AddSessionConfigEntry("session.intra_op.allow_spinning", "0");
                if (cuda) so.AppendExecutionProvider_CUDA(0);
                return graph is null ? _op.CreateSession(options.GraphPath!, so) : _op.CreateSession(graph, so);
            }
            // The CUDA provider is in the GPU package only, and it loads CUDA's libraries when a session asks for it:
            // a missing library is an exception here, which Auto turns into the CPU and a stated reason.
            bool packaged = OrtEnv.Instance().GetAvailableProviders().Contains("CUDAExecutionProvider");
            if (options.Device == OnnxDevice.Cuda && !packaged)
                throw new NotSupportedException("this build's ONNX Runtime has no CUDA provider (build with -p:UseOnnxRuntimeGpu=true).");
            if (options.Device == OnnxDevice.Cpu || !packaged) _session = Session(cuda: false);
            else if (options.Device == OnnxDevice.Auto && options.KvCacheType == Models.KvCacheType.BFloat16)
            {
                // Auto picks what can run what was asked for: a bf16 cache only the CPU attention keeps.
                DeviceFallback = "a bf16 key/value cache was asked for, which only the CPU attention keeps; running on the CPU";
                _session = Session(cuda: false);
            }
            else
            {
                try
                {
                    _session = Session(cuda: true);
                    ExecutionProvider = "CUDA";
                }
                catch (Exception e) when (options.Device == OnnxDevice.Auto && e is OnnxRuntimeException or DllNotFoundException or EntryPointNotFoundException)
                {
                    DeviceFallback = $"the CUDA provider could not start ({e.Message.ReplaceLineEndings(" ")}); running on the CPU";
                    _session = Session(cuda: false);
                }
            }
        }
        catch
        {
            _op.Dispose();
            throw;
        }
        var c = Config;
        _inputNames = [DecoderGraph.InputIds, DecoderGraph.PositionIds, DecoderGraph.Bits, DecoderGraph.SeqLensK, DecoderGraph.TotalSequenceLength, DecoderGraph.LogitsStart,
            .. (InPlaceAttention ? new[] { DecoderGraph.BatchCaches } : []),
            .. Enumerable.Range(0, c.Layers).SelectMany(l => new[] { DecoderGraph.Past(l, false), DecoderGraph.Past(l, true) })];
        _outputNames = [DecoderGraph.Logits, .. Enumerable.Range(0, c.Layers).SelectMany(l => new[] { DecoderGraph.Present(l, false), DecoderGraph.Present(l, true) })];
    }

    /// <inheritdoc/>
    public LlamaConfig Config => _model.Config;

    /// <summary>The model served.</summary>
    public AnyPrecisionModel Model => _model;

    /// <summary>"CUDA" or "CPU": where the session runs.</summary>
    public string ExecutionProvider { get; } = "CPU";

    /// <summary>True when the LM head runs in int8 (<see cref="BitplaneOperator.Int8OpType"/>): the CPU int8 level on an exported graph.</summary>
    public bool Int8Head { get; private set; }

    /// <summary>
    /// True when each layer's attention is a <see cref="BitplaneOperator.AttentionOpType"/> node (<see cref="CausalAttention"/>,
    /// appending to the cache in place): the CPU provider on an exported graph. Otherwise ONNX Runtime's
    /// GroupQueryAttention runs it, its present outputs bound to the cache's buffers.
    /// </summary>
    public bool InPlaceAttention { get; private set; }

    /// <summary>What this engine's caches hold (<see cref="OnnxEngineOptions.KvCacheType"/>).</summary>
    public KvCacheType KvCacheType { get; private set; }

    /// <summary>Why <see cref="OnnxDevice.Auto"/> fell back to the CPU although the CUDA provider was there; null when it did not.</summary>
    public string? DeviceFallback { get; }

    /// <summary>The bitplane operator (its counters give the time spent in kernels).</summary>
    public BitplaneOperator Operator => _op;

    /// <inheritdoc/>
    public int SeedBits => _model.SeedBits;

    /// <inheritdoc/>
    public int ParentBits => _model.ParentBits;

    /// <inheritdoc/>
    public string Kernels => $"bitplane kernels: {_op.Backend.Name}, head {(Int8Head ? "int8" : "fp32")}, kv cache {(KvCacheType == KvCacheType.BFloat16 ? "bf16" : "fp32")}";

    /// <summary>Width used by <see cref="Forward(ReadOnlySpan{int}, KvCache, Span{float})"/>; validated against seed..n.</summary>
    public int Bits
    {
        get => _bits;
        set => _bits = _model.CheckBits(value);
    }

    /// <inheritdoc/>
    public KvCache CreateCache(int capacity = 0)
    {
        if (capacity > Config.MaxSeqLen) throw new ArgumentOutOfRangeException(nameof(capacity), $"capacity {capacity} exceeds the model's context of {Config.MaxSeqLen}.");
        return new OnnxKvCache(Config, capacity <= 0 ? Config.MaxSeqLen : capacity, KvCacheType);
    }

    /// <inheritdoc/>
    public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits) => Forward(tokens, cache, logits, _bits);

    /// <summary>
    /// <see cref="IInferenceEngine.Forward"/> at width <paramref name="bits"/> (for a draft and a target sharing one
    /// engine and one copy of the weights, as in self-speculative decoding).
    /// </summary>
    public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, int bits) => Run(tokens, cache, logits, [_model.CheckBits(bits)]);

    /// <inheritdoc/>
    public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, IReadOnlyList<int> widths)
    {
        ArgumentNullException.ThrowIfNull(widths);
        // The graph's 'bits' input holds one width for every linear, or one per linear (the operator reads its own).
        if (widths.Count != _model.LinearCount) throw new ArgumentException($"the model has {_model.LinearCount} linears; {widths.Count} widths given.", nameof(widths));
        var bitsValue = new int[widths.Count];
        for (int i = 0; i < bitsValue.Length; i++) bitsValue[i] = _model.CheckBits(widths[i]);
        Run(tokens, cache, logits, bitsValue);
    }

    private void Run(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, int[] bitsValue)
    {
        var kv = OwnCache(cache, nameof(cache));
        // Marked busy before its length is read: a second pass on it meanwhile is refused, not run at the same position.
        kv.Enter();
        try
        {
            bool allLogits = ForwardArguments.Check(Config, tokens, cache, logits);
            int n = tokens.Length, pos0 = kv.Length;
            var positions = new long[n];
            for (int t = 0; t < n; t++) positions[t] = pos0 + t;
            Run(tokens, positions, pos0 + n, allLogits ? 0 : n - 1, kv, [], logits, bitsValue);
            kv.Advance(n);
        }
        finally { kv.Exit(); }
    }

    /// <summary>
    /// <inheritdoc/> On the CPU graph the steps run as one pass of B tokens: every linear reads its planes once for all of
    /// them, and each Attention node appends token i to cache i at that cache's position. Elsewhere (GroupQueryAttention
    /// takes one cache), one pass per sequence.
    /// </summary>
    public void ForwardBatch(ReadOnlySpan<int> tokens, IReadOnlyList<KvCache> caches, Span<float> logits, int bits)
    {
        if (!InPlaceAttention)
        {
            ForwardArguments.ForwardEach(this, tokens, caches, logits, bits);
            return;
        }
        ForwardArguments.CheckBatch(Config, tokens, caches, logits);
        int n = tokens.Length;
        var kvs = new OnnxKvCache[n];
        for (int i = 0; i < n; i++) kvs[i] = OwnCache(caches[i], nameof(caches));
        var positions = new long[n];
        var ids = new long[n];
        int entered = 0;
        try
        {
            // Each cache marked busy before its length is read; the lengths checked again now that no other pass moves them.
            for (; entered < n; entered++) kvs[entered].Enter();
            ForwardArguments.CheckBatch(Config, tokens, caches, logits);
            for (int i = 0; i < n; i++) (positions[i], ids[i]) = (kvs[i].Length, kvs[i].Id);
            using (_op.LendCaches(kvs))
                // total_sequence_length and seqlens_k are not read for a batch (each cache has its own length); the past
                // inputs are bound to the first cache only because the graph has them.
                Run(tokens, positions, n, 0, kvs[0], ids, logits, [_model.CheckBits(bits)]);
            foreach (var kv in kvs) kv.Advance(1);
        }
        finally
        {
            for (int i = 0; i < entered; i++) kvs[i].Exit();
        }
    }

    private OnnxKvCache OwnCache(KvCache cache, string parameter)
    {
        if (cache is not OnnxKvCache kv || kv.Owner != Config) throw new ArgumentException("the cache was not created by this engine.", parameter);
        if (kv.Type != KvCacheType) throw new ArgumentException($"the cache holds {kv.Type}; this engine's caches hold {KvCacheType} (make it with this engine's CreateCache).", parameter);
        return kv;
    }

    /// <summary>One session run: <paramref name="tokens"/> at <paramref name="positions"/>, logits from row <paramref name="logitsStart"/> on.</summary>
    private void Run(ReadOnlySpan<int> tokens, long[] positions, int total, int logitsStart, OnnxKvCache kv, long[] batchCaches, Span<float> logits, int[] bitsValue)
    {
        int n = tokens.Length, vocab = Config.VocabSize;
        var ids = new long[n];
        for (int t = 0; t < n; t++) ids[t] = tokens[t];
        int[] seqLensK = [total - 1], totalValue = [total];
        long[] start = [logitsStart];
        var inputs = new List<OrtValue>(_inputNames.Length);
        var outputs = new List<OrtValue>(_outputNames.Length);
        int owned = -1; // inputs made here (the rest are the cache's own); all of the list until they are complete
        try
        {
            inputs.Add(OrtValue.CreateTensorValueFromMemory(ids, [1, n]));
            inputs.Add(OrtValue.CreateTensorValueFromMemory(positions, [1, n]));
            inputs.Add(OrtValue.CreateTensorValueFromMemory(bitsValue, [bitsValue.Length]));
            inputs.Add(OrtValue.CreateTensorValueFromMemory(seqLensK, [1]));
            inputs.Add(OrtValue.CreateTensorValueFromMemory(totalValue, []));
            inputs.Add(OrtValue.CreateTensorValueFromMemory(start, [1]));
            if (InPlaceAttention) inputs.Add(OrtValue.CreateTensorValueFromMemory(batchCaches, [batchCaches.Length]));
            owned = inputs.Count;
            fixed (float* lp = logits)
            {
                outputs.Add(OrtValue.CreateTensorValueWithData(OrtMemoryInfo.DefaultInstance, TensorElementType.Float, [1, n - logitsStart, vocab], (nint)lp, (long)logits.Length * 4));
                // The cache's own values, made once with it: past and present on the same pinned buffers, so
                // GroupQueryAttention appends in place; the Attention nodes append to the past ones and return nothing.
                inputs.AddRange(kv.Past);
                if (InPlaceAttention) _session.Run(_run, _inputNames, inputs, _logitsOnly, outputs);
                else
                {
                    outputs.AddRange(kv.Present);
                    _session.Run(_run, _inputNames, inputs, _outputNames, outputs);
                }
            }
        }
        finally
        {
            for (int i = 0; i < (owned < 0 ? inputs.Count : owned); i++) inputs[i].Dispose();
            if (outputs.Count > 0) outputs[0].Dispose();
        }
    }

    /// <summary>Closes the session, then releases the operator (the model stays open: it is the caller's).</summary>
    public void Dispose()
    {
        _session.Dispose();
        _embedding?.Dispose();
        _run.Dispose();
        _op.Dispose();
    }

}

/// <summary>
/// The ONNX engine's cache: per layer, pinned [1, kv_heads, capacity, head_dim] keys and values (fp32, or bf16 bits),
/// as GroupQueryAttention lays them out, with the OrtValues over them made once (ONNX Runtime's finalizer releases them
/// with the cache).
/// </summary>
internal sealed unsafe class OnnxKvCache : KvCache
{
    public OnnxKvCache(LlamaConfig owner, int capacity, KvCacheType type)
    {
        Owner = owner;
        Capacity = capacity;
        Type = type;
        int size = checked(owner.KvHeads * capacity * owner.HeadDim), bytes = type == KvCacheType.BFloat16 ? 2 : 4;
        long[] shape = [1, owner.KvHeads, capacity, owner.HeadDim];
        var element = type == KvCacheType.BFloat16 ? TensorElementType.BFloat16 : TensorElementType.Float;
        Past = new OrtValue[2 * owner.Layers];
        Present = new OrtValue[2 * owner.Layers];
        _buffers = new Array[2 * owner.Layers];
        for (int i = 0; i < _buffers.Length; i++)
        {
            // Even entries are keys, odd ones values, in the order of the graph's inputs and outputs; bf16 as its bits.
            _buffers[i] = type == KvCacheType.BFloat16 ? GC.AllocateArray<ushort>(size, pinned: true) : GC.AllocateArray<float>(size, pinned: true);
            nint data = (nint)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(_buffers[i]));
            Past[i] = OrtValue.CreateTensorValueWithData(OrtMemoryInfo.DefaultInstance, element, shape, data, (long)size * bytes);
            Present[i] = OrtValue.CreateTensorValueWithData(OrtMemoryInfo.DefaultInstance, element, shape, data, (long)size * bytes);
        }
    }

    private readonly Array[] _buffers; // float[] or ushort[] (bf16 bits)
    private static long s_ids;

    /// <summary>This cache's id in a batched call's batch_caches input (unique in the process).</summary>
    public long Id { get; } = Interlocked.Increment(ref s_ids);

    /// <summary>Buffer <paramref name="index"/> (layer index/2's keys when even, its values when odd): pinned, so the address holds while the cache lives.</summary>
    public void* Data(int index) => Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(_buffers[index]));

    public LlamaConfig Owner { get; }
    public override int Capacity { get; }
    /// <summary>What the buffers hold.</summary>
    public KvCacheType Type { get; }
    /// <summary>past_key_values.{l}.key/value inputs.</summary>
    public OrtValue[] Past { get; }
    /// <summary>present.{l}.key/value outputs over the same memory.</summary>
    public OrtValue[] Present { get; }
    public void Advance(int n) => Length += n;

    private int _busy;

    /// <summary>Marks the cache as in a forward pass; a second pass on it meanwhile (another thread, a batch) is refused.</summary>
    public void Enter()
    {
        if (Interlocked.Exchange(ref _busy, 1) != 0) throw new InvalidOperationException("the cache is in another forward pass: a sequence's steps run one at a time.");
    }

    /// <summary>Ends <see cref="Enter"/>.</summary>
    public void Exit() => Volatile.Write(ref _busy, 0);

    /// <summary>Bytes the keys and values of every layer take, whole capacity.</summary>
    public long Bytes => _buffers.Sum(b => (long)b.Length * (Type == KvCacheType.BFloat16 ? 2 : 4));

    protected override void Erase(int from, int to)
    {
        // [1, kv_heads, capacity, head_dim]: each head's positions are contiguous.
        int hd = Owner.HeadDim;
        foreach (var buffer in _buffers)
            for (int h = 0; h < Owner.KvHeads; h++)
                Array.Clear(buffer, (h * Capacity + from) * hd, (to - from) * hd);
    }

    internal override IReadOnlyList<float[]> Buffers => [.. _buffers.Select(b => b is ushort[] bf16 ? Widened(bf16) : (float[])((float[])b).Clone())];

    private protected override void CopyPositions(KvCache destination, int count)
    {
        var to = (OnnxKvCache)destination;
        if (to.Owner != Owner || to.Type != Type) throw new ArgumentException("the caches come from different engines or hold different types.", nameof(destination));
        // [kv_heads, capacity, head_dim]: each head's first positions are one contiguous run.
        int hd = Owner.HeadDim;
        for (int i = 0; i < _buffers.Length; i++)
            for (int h = 0; h < Owner.KvHeads; h++)
                Array.Copy(_buffers[i], (long)h * Capacity * hd, to._buffers[i], (long)h * to.Capacity * hd, (long)count * hd);
    }

    private static float[] Widened(ushort[] bf16)
    {
        var values = new float[bf16.Length];
        TensorEncoding.WidenBFloat16(bf16, values);
        return values;
    }
}
