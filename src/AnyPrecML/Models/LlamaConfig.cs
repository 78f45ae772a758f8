namespace AnyPrecML.Models;

/// <summary>How rotary embeddings pair the dimensions of a head.</summary>
public enum RopeLayout
{
    /// <summary>Pairs (2i, 2i+1): Meta's original layout, used by llama2.c checkpoints.</summary>
    Interleaved,
    /// <summary>Pairs (i, i + headDim/2): Hugging Face's "rotate_half" layout (q/k rows permuted on conversion).</summary>
    HalfSplit,
}

/// <summary>The shape and constants of a Llama-architecture decoder (Llama 1/2/3, Mistral without sliding window).</summary>
public sealed record LlamaConfig
{
    /// <summary>Model (residual stream) width.</summary>
    public required int Dim { get; init; }
    /// <summary>Width of the SwiGLU hidden layer.</summary>
    public required int HiddenDim { get; init; }
    /// <summary>Number of decoder blocks.</summary>
    public required int Layers { get; init; }
    /// <summary>Number of query heads.</summary>
    public required int Heads { get; init; }
    /// <summary>Number of key/value heads (grouped-query attention when fewer than <see cref="Heads"/>).</summary>
    public required int KvHeads { get; init; }
    /// <summary>Vocabulary size (rows of the embedding and of the output head).</summary>
    public required int VocabSize { get; init; }
    /// <summary>Longest context the model supports.</summary>
    public required int MaxSeqLen { get; init; }
    /// <summary>Width of one attention head; Dim / Heads unless the checkpoint says otherwise.</summary>
    public int HeadDim { get; init; }
    /// <summary>Epsilon of RMSNorm.</summary>
    public float RmsNormEps { get; init; } = 1e-5f;
    /// <summary>Base of the rotary frequencies.</summary>
    public float RopeTheta { get; init; } = 10000f;
    /// <summary>Dimension pairing of rotary embeddings.</summary>
    public RopeLayout RopeLayout { get; init; } = RopeLayout.HalfSplit;
    /// <summary>True when the output head shares the token embedding matrix.</summary>
    public bool TiedEmbeddings { get; init; }
    /// <summary>Beginning-of-sequence token id.</summary>
    public int BosTokenId { get; init; } = 1;
    /// <summary>End-of-sequence token id.</summary>
    public int EosTokenId { get; init; } = 2;

    /// <summary>Width of all query heads together.</summary>
    public int QDim => Heads * HeadDim;
    /// <summary>Width of all key (or value) heads together.</summary>
    public int KvDim => KvHeads * HeadDim;

    /// <summary>Checks that the numbers describe a buildable model; throws <see cref="ModelFormatException"/> naming <paramref name="source"/> otherwise.</summary>
    public LlamaConfig Validated(string source)
    {
        void Check(bool ok, string what)
        {
            if (!ok) throw new ModelFormatException($"{source}: invalid model configuration: {what}.");
        }
        // Upper bounds keep a hostile header from driving allocations: they are far above any real Llama.
        Check(Dim is > 0 and <= 65536, $"dim {Dim} must be in 1..65536");
        Check(HiddenDim is > 0 and <= 262144, $"hidden_dim {HiddenDim} must be in 1..262144");
        Check(Layers is > 0 and <= 1024, $"n_layers {Layers} must be in 1..1024");
        Check(Heads is > 0 and <= 1024, $"n_heads {Heads} must be in 1..1024");
        Check(KvHeads > 0 && KvHeads <= Heads && Heads % KvHeads == 0, $"n_kv_heads {KvHeads} must divide n_heads {Heads}");
        Check(HeadDim > 0 && HeadDim % 2 == 0 && HeadDim <= 1024, $"head_dim {HeadDim} must be even and in 2..1024");
        Check(VocabSize is > 0 and <= 1 << 22, $"vocab_size {VocabSize} must be in 1..4194304");
        Check(MaxSeqLen is > 0 and <= 1 << 22, $"max_seq_len {MaxSeqLen} must be in 1..4194304");
        Check(RmsNormEps > 0 && float.IsFinite(RmsNormEps), $"rms_norm_eps {RmsNormEps} must be positive");
        Check(RopeTheta > 0 && float.IsFinite(RopeTheta), $"rope_theta {RopeTheta} must be positive");
        return this;
    }

    /// <summary>Number of parameters, counting a tied head once.</summary>
    public long ParameterCount =>
        (long)VocabSize * Dim * (TiedEmbeddings ? 1 : 2) + Dim
        + (long)Layers * (2L * Dim + (long)Dim * QDim + 2L * Dim * KvDim + (long)QDim * Dim + 3L * Dim * HiddenDim);
}
