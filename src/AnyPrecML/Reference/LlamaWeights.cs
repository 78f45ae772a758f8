using AnyPrecML.Models;

namespace AnyPrecML.Reference;

/// <summary>The weights of one decoder block as fp32 arrays; linear weights are row-major [out, in].</summary>
public sealed class BlockWeights
{
    public required float[] AttentionNorm { get; init; }
    public required float[] Wq { get; init; }
    public required float[] Wk { get; init; }
    public required float[] Wv { get; init; }
    public required float[] Wo { get; init; }
    public required float[] FfnNorm { get; init; }
    /// <summary>gate_proj (llama2.c w1).</summary>
    public required float[] Gate { get; init; }
    /// <summary>up_proj (llama2.c w3).</summary>
    public required float[] Up { get; init; }
    /// <summary>down_proj (llama2.c w2).</summary>
    public required float[] Down { get; init; }

    /// <summary>The linear weight called <paramref name="part"/> (a name from <see cref="LlamaTensorNames.BlockLinears"/>).</summary>
    public float[] Linear(string part) => part switch
    {
        "self_attn.q_proj" => Wq, "self_attn.k_proj" => Wk, "self_attn.v_proj" => Wv, "self_attn.o_proj" => Wo,
        "mlp.gate_proj" => Gate, "mlp.up_proj" => Up, "mlp.down_proj" => Down,
        _ => throw new ArgumentException($"unknown linear '{part}'", nameof(part)),
    };
}

/// <summary>All weights of a Llama model in fp32, as the reference engine uses them.</summary>
public sealed class LlamaWeights
{
    public required LlamaConfig Config { get; init; }
    public required float[] Embedding { get; init; }
    public required BlockWeights[] Blocks { get; init; }
    public required float[] FinalNorm { get; init; }
    /// <summary>Output head [vocab, dim]; the same array as <see cref="Embedding"/> when tied.</summary>
    public required float[] Head { get; init; }

    /// <summary>Converts every tensor of <paramref name="checkpoint"/> to fp32.</summary>
    /// <param name="checkpoint">The opened checkpoint.</param>
    /// <param name="linear">Optional source of the block linear weights (layer, part) → [out, in] fp32, e.g. dequantized ones; null reads the checkpoint.</param>
    public static LlamaWeights FromCheckpoint(LlamaCheckpoint checkpoint, Func<int, string, float[]>? linear = null)
    {
        var c = checkpoint.Config;
        float[] T(string name) => checkpoint[name].ToFloatArray();
        float[] L(int l, string part) => linear?.Invoke(l, part) ?? T(LlamaTensorNames.Layer(l, part));
        var embedding = T(LlamaTensorNames.Embedding);
        return new LlamaWeights
        {
            Config = c,
            Embedding = embedding,
            Blocks = Enumerable.Range(0, c.Layers).Select(l => new BlockWeights
            {
                AttentionNorm = T(LlamaTensorNames.Layer(l, "input_layernorm")),
                Wq = L(l, "self_attn.q_proj"), Wk = L(l, "self_attn.k_proj"), Wv = L(l, "self_attn.v_proj"), Wo = L(l, "self_attn.o_proj"),
                FfnNorm = T(LlamaTensorNames.Layer(l, "post_attention_layernorm")),
                Gate = L(l, "mlp.gate_proj"), Up = L(l, "mlp.up_proj"), Down = L(l, "mlp.down_proj"),
            }).ToArray(),
            FinalNorm = T(LlamaTensorNames.FinalNorm),
            Head = c.TiedEmbeddings ? embedding : T(LlamaTensorNames.Head),
        };
    }
}
