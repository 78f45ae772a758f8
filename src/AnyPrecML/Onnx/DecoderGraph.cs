using System.Runtime.InteropServices;
using AnyPrecML.Models;
using AnyPrecML.Onnx.Proto;
using AnyPrecML.Quantization;
using DataType = AnyPrecML.Onnx.Proto.TensorProto.Types.DataType;

namespace AnyPrecML.Onnx;

/// <summary>
/// Writes the whole Llama decoder of an any-precision model as one ONNX graph. The non-linear parts are
/// ONNX Runtime's own operators (Gather of the embedding in its stored type, then Cast, SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, Gemm for an
/// fp32 head; for attention GroupQueryAttention, with RotaryEmbedding and Split for heads narrower than 16) except
/// the CPU engine's attention, a <see cref="BitplaneOperator.AttentionOpType"/> node per layer; every quantized linear is in a
/// <see cref="BitplaneOperator"/> node naming its layers (q,k,v in one; gate,up in one that also applies SwiGLU), so the graph holds no bitplanes at all, only the float
/// tensors (embedding, norms, head). The width is the graph input <c>bits</c>, so one session serves every b.
/// </summary>
/// <remarks>
/// Inputs: <c>input_ids</c> int64 [1, S]; <c>position_ids</c> int64 [1, S] (read by the RotaryEmbedding nodes of heads
/// narrower than 16; the fused GroupQueryAttention derives positions from <c>seqlens_k</c>); <c>bits</c> int32 [1] (every linear's width) or [linears] (one per
/// linear in <see cref="AnyPrecisionModel.LinearIndex"/> order: a precision profile);
/// <c>seqlens_k</c> int32 [1] (positions in the cache after this call, minus one); <c>total_sequence_length</c>
/// int32 scalar; <c>logits_start</c> int64 [1] (first position whose logits are returned: 0 for all, S-1 for the
/// last); <c>past_key_values.{l}.key|value</c> fp32, or bf16 for a bf16 cache (CPU attention only), [1, kv_heads, capacity, head_dim]. Outputs: <c>logits</c>
/// fp32 [1, S - logits_start, vocab], and in graphs whose attention is GroupQueryAttention <c>present.{l}.key|value</c>,
/// which the engine binds to the same buffers as the past ones (GroupQueryAttention then appends in place; the CPU
/// graph's Attention nodes write into the past buffers themselves). The CPU graph has one more input,
/// <c>batch_caches</c> int64 [B]: empty for one sequence; for a decode step of B sequences (S = B, token i of
/// sequence i) the ids of their caches, which the engine lends the Attention nodes for the call (the past inputs are then
/// not read).
/// </remarks>
public static class DecoderGraph
{
    /// <summary>Graph input names.</summary>
    public const string InputIds = "input_ids", PositionIds = "position_ids", Bits = "bits", SeqLensK = "seqlens_k",
        TotalSequenceLength = "total_sequence_length", LogitsStart = "logits_start", Logits = "logits", BatchCaches = "batch_caches";

    /// <summary>Past key (or value) input of block <paramref name="layer"/>.</summary>
    public static string Past(int layer, bool value) => $"past_key_values.{layer}.{(value ? "value" : "key")}";

    /// <summary>Present key (or value) output of block <paramref name="layer"/>.</summary>
    public static string Present(int layer, bool value) => $"present.{layer}.{(value ? "value" : "key")}";

    /// <summary>
    /// The ONNX model of <paramref name="model"/>'s decoder. With <paramref name="int8Head"/> the LM head is an
    /// <see cref="BitplaneOperator.Int8OpType"/> node (int8 weights per row, int8 activations per token: the int8 level's
    /// arithmetic, a quarter of the fp32 head's bytes per token) instead of an fp32 Gemm, and the graph holds no fp32 copy
    /// of an untied head. With <paramref name="cpuAttention"/> (the CPU engine's graph) each layer's attention is an
    /// <see cref="BitplaneOperator.AttentionOpType"/> node (<see cref="Kernels.CausalAttention"/>), which rotates, appends
    /// to the past key and value in place and attends, and the graph's only output is the logits. Without it, attention is
    /// ONNX Runtime's GroupQueryAttention (the CUDA provider's graph).
    /// </summary>
    public static ModelProto Export(AnyPrecisionModel model, bool int8Head = false, bool cpuAttention = false) =>
        Export(model, int8Head, cpuAttention, embeddingByReference: false);

    /// <summary>
    /// The ONNX type the embedding table keeps in the graph when it goes in as stored (its file's bytes), or null when it
    /// is converted to fp32 first (a tied table that an fp32 Gemm head reads too, or a type that is not F32, F16 or BF16).
    /// </summary>
    internal static DataType? StoredEmbeddingType(AnyPrecisionModel model, bool int8Head)
    {
        var view = model.Checkpoint[LlamaTensorNames.Embedding];
        var stored = view.DType switch { DType.BF16 => DataType.Bfloat16, DType.F16 => DataType.Float16, DType.F32 => DataType.Float, _ => (DataType?)null };
        return stored is DataType.Bfloat16 or DataType.Float16 && model.Config.TiedEmbeddings && !int8Head ? null : stored;
    }

    /// <summary>
    /// <see cref="Export(AnyPrecisionModel, bool, bool)"/>; with <paramref name="embeddingByReference"/> and a table that
    /// goes in as stored (<see cref="StoredEmbeddingType"/>), the table's initializer holds no data, only an external
    /// reference to where it lies in the model's file; the engine gives the session the table itself through
    /// SessionOptions.AddInitializer over the mapped file: the graph, its bytes and ONNX Runtime's parse then carry no
    /// copy of the largest tensor. <paramref name="cacheType"/>: the element type of the past key/value inputs (bf16 only
    /// with <paramref name="cpuAttention"/>).
    /// </summary>
    internal static ModelProto Export(AnyPrecisionModel model, bool int8Head, bool cpuAttention, bool embeddingByReference, KvCacheType cacheType = KvCacheType.Float32)
    {
        if (cacheType == KvCacheType.BFloat16 && !cpuAttention) throw new ArgumentException("a bf16 cache needs the CPU attention: GroupQueryAttention's cache is fp32 here.", nameof(cacheType));
        var cacheData = cacheType == KvCacheType.BFloat16 ? DataType.Bfloat16 : DataType.Float;
        ArgumentNullException.ThrowIfNull(model);
        var c = model.Config;
        var cp = model.Checkpoint;
        var g = new OnnxGraphBuilder("anyprecision_decoder");
        g.Input(InputIds, DataType.Int64, 1, "sequence");
        g.Input(PositionIds, DataType.Int64, 1, "sequence");
        g.Input(Bits, DataType.Int32, "widths");
        g.Input(SeqLensK, DataType.Int32, 1);
        g.Input(TotalSequenceLength, DataType.Int32);
        g.Input(LogitsStart, DataType.Int64, 1);
        if (cpuAttention) g.Input(BatchCaches, DataType.Int64, "batch");
        for (int l = 0; l < c.Layers; l++)
            foreach (bool v in new[] { false, true })
            {
                g.Input(Past(l, v), cacheData, 1, c.KvHeads, "capacity", c.HeadDim);
                if (!cpuAttention) g.Output(Present(l, v), DataType.Float, 1, c.KvHeads, "capacity", c.HeadDim);
            }
        g.Output(Logits, DataType.Float, 1, "logits_sequence", c.VocabSize);

        float[] Tensor(string name) => cp[name].ToFloatArray();
        // The embedding table stays in its file's type (a Gather of its rows, then a Cast of those to fp32) unless an fp32
        // Gemm head reads it too (tied, fp32 head). Converted whole to fp32, a bf16 model's largest tensor doubled (262 MB
        // at the 1.1B shape) in the graph, in its serialized copy and in ONNX Runtime's, and its start-up faulted in and
        // copied every page of those.
        var stored = StoredEmbeddingType(model, int8Head);
        bool castRows = stored is DataType.Bfloat16 or DataType.Float16;
        string embedding = stored is not DataType type ? g.Initializer(LlamaTensorNames.Embedding, Tensor(LlamaTensorNames.Embedding), c.VocabSize, c.Dim)
            : embeddingByReference ? g.ExternalInitializer(LlamaTensorNames.Embedding, type, [c.VocabSize, c.Dim], cp[LlamaTensorNames.Embedding])
            : g.Initializer(LlamaTensorNames.Embedding, type, [c.VocabSize, c.Dim], cp[LlamaTensorNames.Embedding].Bytes);
        string headTensor = c.TiedEmbeddings ? LlamaTensorNames.Embedding : LlamaTensorNames.Head;
        string head = c.TiedEmbeddings ? embedding : int8Head ? "" : g.Initializer(LlamaTensorNames.Head, Tensor(LlamaTensorNames.Head), c.VocabSize, c.Dim);
        var (cos, sin) = Reference.ReferenceEngine.RopeTables(c, 0, c.MaxSeqLen); // the reference engine's own angles
        g.Initializer("rope.cos_cache", cos, c.MaxSeqLen, c.HeadDim / 2);
        g.Initializer("rope.sin_cache", sin, c.MaxSeqLen, c.HeadDim / 2);
        long interleaved = c.RopeLayout == RopeLayout.Interleaved ? 1 : 0;
        float eps = c.RmsNormEps;

        // One node per group of linears that read the same x (q,k,v; gate,up): x is quantized once and every row of
        // the group runs in one pass of the kernel pool, where separate nodes paid each of those per matrix.
        string Linear(int l, string output, string input, string activation, params string[] parts)
        {
            var ws = parts.Select(part => model.Linear(l, part)).ToArray();
            string name = $"model.layers.{l}.{output}";
            var attributes = new List<(string, object)> { ("layer", string.Join(",", ws.Select(w => w.Name))), ("rows", (long)ws.Sum(w => w.Rows)), ("cols", (long)ws[0].Cols) };
            if (activation.Length > 0) attributes.Add(("activation", activation));
            g.Node(BitplaneOperator.OpType, [input, Bits], [name], BitplaneOperator.Domain, name, [.. attributes]);
            return name;
        }
        // Heads a multiple of 16 wide (every real Llama): one GroupQueryAttention node per layer takes the packed q,k,v
        // and applies the rotary embedding itself, where a Split and two RotaryEmbedding nodes ran before it (1.1B shape,
        // 3 bits, AVX-512: 14.2-14.3 ms per token against 14.9-15.3). ONNX Runtime's CPU kernel rotates only such heads;
        // narrower ones (stories260K's 8) keep the separate nodes.
        bool fusedAttention = !cpuAttention && FusedAttention(c);
        if (!fusedAttention && !cpuAttention) g.Initializer("split.qkv", [(long)c.QDim, c.KvDim, c.KvDim], 3);
        string Norm(string name) => g.Initializer(name, Tensor(name), c.Dim);

        g.Node("Gather", [embedding, InputIds], [castRows ? "embedded.stored" : "embedded"], name: "embed_tokens", attributes: ("axis", 0L));
        if (castRows) g.Node("Cast", ["embedded.stored"], ["embedded"], name: "embed_tokens_to_float", attributes: ("to", (long)DataType.Float));
        string residual = "embedded", pending = "";
        for (int l = 0; l < c.Layers; l++)
        {
            string p = $"model.layers.{l}";
            string attnNorm = Norm(LlamaTensorNames.Layer(l, "input_layernorm"));
            string normed = $"{p}.input_layernorm.out";
            if (l == 0)
                g.Node("SimplifiedLayerNormalization", [residual, attnNorm], [normed], name: $"{p}.input_layernorm", attributes: [("axis", -1L), ("epsilon", eps)]);
            else
            {
                // residual + the previous block's MLP output, normalised, in one fused node (output 3 is the sum).
                g.Node("SkipSimplifiedLayerNormalization", [residual, pending, attnNorm], [normed, "", "", $"{p}.residual_in"], "com.microsoft", $"{p}.input_layernorm", ("epsilon", eps));
                residual = $"{p}.residual_in";
            }
            string qkv = Linear(l, "self_attn.qkv_proj", normed, "", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj");
            var heads = new (string, object)[] { ("num_heads", (long)c.Heads), ("kv_num_heads", (long)c.KvHeads), ("scale", 1f / MathF.Sqrt(c.HeadDim)) };
            if (cpuAttention)
                g.Node(BitplaneOperator.AttentionOpType, [qkv, Past(l, false), Past(l, true), SeqLensK, TotalSequenceLength, "rope.cos_cache", "rope.sin_cache", BatchCaches],
                    [$"{p}.attention"], BitplaneOperator.Domain, $"{p}.self_attn",
                    ("num_heads", (long)c.Heads), ("kv_num_heads", (long)c.KvHeads), ("interleaved", interleaved), ("layer", (long)l));
            else if (fusedAttention)
                g.Node("GroupQueryAttention", [qkv, "", "", Past(l, false), Past(l, true), SeqLensK, TotalSequenceLength, "rope.cos_cache", "rope.sin_cache"],
                    [$"{p}.attention", Present(l, false), Present(l, true)], "com.microsoft", $"{p}.self_attn",
                    [.. heads, ("do_rotary", 1L), ("rotary_interleaved", interleaved)]);
            else
            {
                string q = $"{p}.self_attn.q", k = $"{p}.self_attn.k", v = $"{p}.self_attn.v";
                g.Node("Split", [qkv, "split.qkv"], [q, k, v], name: $"{p}.self_attn.qkv_split", attributes: ("axis", -1L));
                g.Node("RotaryEmbedding", [q, PositionIds, "rope.cos_cache", "rope.sin_cache"], [$"{p}.q_rot"], "com.microsoft", $"{p}.q_rotary", ("interleaved", interleaved));
                g.Node("RotaryEmbedding", [k, PositionIds, "rope.cos_cache", "rope.sin_cache"], [$"{p}.k_rot"], "com.microsoft", $"{p}.k_rotary", ("interleaved", interleaved));
                g.Node("GroupQueryAttention", [$"{p}.q_rot", $"{p}.k_rot", v, Past(l, false), Past(l, true), SeqLensK, TotalSequenceLength],
                    [$"{p}.attention", Present(l, false), Present(l, true)], "com.microsoft", $"{p}.self_attn", heads);
            }
            string o = Linear(l, "self_attn.o_proj", $"{p}.attention", "", "self_attn.o_proj");
            string ffnNorm = Norm(LlamaTensorNames.Layer(l, "post_attention_layernorm"));
            g.Node("SkipSimplifiedLayerNormalization", [residual, o, ffnNorm], [$"{p}.post_attention_layernorm.out", "", "", $"{p}.residual_mid"], "com.microsoft", $"{p}.post_attention_layernorm", ("epsilon", eps));
            residual = $"{p}.residual_mid";
            // silu(gate)·up in the same node: the two products and the activation, no Sigmoid/Mul nodes between.
            string swiglu = Linear(l, "mlp.gate_up_proj", $"{p}.post_attention_layernorm.out", "swiglu", "mlp.gate_proj", "mlp.up_proj");
            pending = Linear(l, "mlp.down_proj", swiglu, "", "mlp.down_proj");
        }
        string finalNorm = Norm(LlamaTensorNames.FinalNorm);
        g.Node("SkipSimplifiedLayerNormalization", [residual, pending, finalNorm], ["final_norm.out"], "com.microsoft", "model.norm", ("epsilon", eps));
        // Only the positions whose logits are wanted go through the head (the last one when decoding).
        g.Initializer("slice.end", [long.MaxValue], 1);
        g.Initializer("slice.axis", [1L], 1);
        g.Node("Slice", ["final_norm.out", LogitsStart, "slice.end", "slice.axis"], ["head.in"], name: "logits_slice");
        if (int8Head)
            g.Node(BitplaneOperator.Int8OpType, ["head.in"], [Logits], BitplaneOperator.Domain, "lm_head",
                ("weight", headTensor), ("rows", (long)c.VocabSize), ("cols", (long)c.Dim));
        else
        {
            g.Initializer("shape.rows", [-1L, c.Dim], 2);
            g.Initializer("shape.logits", [1L, -1L, c.VocabSize], 3);
            g.Node("Reshape", ["head.in", "shape.rows"], ["head.in2d"], name: "head_reshape_in");
            g.Node("Gemm", ["head.in2d", head], ["logits2d"], name: "lm_head", attributes: ("transB", 1L));
            g.Node("Reshape", ["logits2d", "shape.logits"], [Logits], name: "head_reshape_out");
        }

        var proto = g.Build((BitplaneOperator.Domain, 1), ("com.microsoft", 1));
        proto.DocString = $"AnyPrecML any-precision decoder: {c.Layers} layers, bits {model.SeedBits}..{model.ParentBits} chosen per run by the 'bits' input.";
        proto.MetadataProps.Add(new StringStringEntryProto { Key = "anyprecision.seed_bits", Value = model.SeedBits.ToString(System.Globalization.CultureInfo.InvariantCulture) });
        proto.MetadataProps.Add(new StringStringEntryProto { Key = "anyprecision.parent_bits", Value = model.ParentBits.ToString(System.Globalization.CultureInfo.InvariantCulture) });
        return proto;
    }

    /// <summary>True when <see cref="Export(AnyPrecisionModel, bool, bool)"/> writes one fused attention node per layer (rotary inside GroupQueryAttention): heads a multiple of 16 wide.</summary>
    public static bool FusedAttention(LlamaConfig config) => config.HeadDim % 16 == 0;

    /// <summary>Writes <see cref="Export(AnyPrecisionModel, bool, bool)"/>'s model to <paramref name="path"/> (temporary name, then rename).</summary>
    public static void Save(AnyPrecisionModel model, string path) => OnnxGraphBuilder.Save(Export(model), path);
}
