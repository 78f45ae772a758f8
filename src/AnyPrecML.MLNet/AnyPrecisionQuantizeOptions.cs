namespace AnyPrecML.MLNet;

/// <summary>Which engine an <see cref="AnyPrecisionTransformer"/> runs.</summary>
public enum AnyPrecisionEngineKind
{
    /// <summary>ONNX Runtime with the bitplane custom operator: one session serves every width (the default).</summary>
    Onnx,
    /// <summary>The managed fp32 reference engine on each width's dequantized weights (dequantized on first use).</summary>
    Reference,
}

/// <summary>Options of <c>mlContext.Transforms.AnyPrecisionQuantize</c>.</summary>
public sealed class AnyPrecisionQuantizeOptions
{
    /// <summary>
    /// The model: a llama2.c file or Hugging Face directory to quantize, or an any-precision directory (then
    /// <see cref="Microsoft.ML.IEstimator{TTransformer}.Fit"/> skips quantization).
    /// </summary>
    public string ModelPath { get; set; } = "";

    /// <summary>Where the quantized model is written (default: beside the source, named &lt;source&gt;.anyprec). Existing output is replaced.</summary>
    public string? OutputDirectory { get; set; }

    /// <summary>Tokenizer to use: a SentencePiece tokenizer.model or a llama2.c tokenizer.bin (default: the one beside the model).</summary>
    public string? TokenizerPath { get; set; }

    /// <summary>The text column: calibration text for Fit, the rows scored by Transform.</summary>
    public string InputColumnName { get; set; } = "Text";

    /// <summary>Seed width: 2^seed centroids per row before upscaling.</summary>
    public int SeedBits { get; set; } = 3;

    /// <summary>Parent width n (≤ 8).</summary>
    public int ParentBits { get; set; } = 8;

    /// <summary>Sensitivity of the weighted k-means: "fisher", "hessian" (default) or "uniform".</summary>
    public string Sensitivity { get; set; } = "hessian";

    /// <summary>Calibration documents taken from the input column: each non-empty line of its rows is one sequence, BOS first.</summary>
    public int CalibrationSamples { get; set; } = 100;

    /// <summary>Each calibration document is truncated to its first this many tokens (capped by the model's context).</summary>
    public int CalibrationLength { get; set; } = 512;

    /// <summary>Width Transform uses at first (default: the parent width); change it later with <see cref="AnyPrecisionTransformer.Bits"/>.</summary>
    public int? Bits { get; set; }

    /// <summary>
    /// A precision profile file (one width per linear, written by <c>anyprec profile</c> or <see cref="Quantization.PrecisionProfile.Save"/>):
    /// rows run at it instead of at <see cref="Bits"/>, a model of its average width from the same parent. Its widths are
    /// kept in a saved pipeline. Setting <see cref="AnyPrecisionTransformer.Bits"/> later returns to one width.
    /// </summary>
    public string? ProfilePath { get; set; }

    /// <summary>
    /// An optional column of per-row latency budgets (milliseconds per generated token, any numeric type; missing, NaN or
    /// ≤ 0: no budget). A row with a budget runs at the widest width, or draft/target pair, whose cost measured on this
    /// machine meets it (<see cref="Generation.PrecisionRouter"/>; costs cached beside the model); the <c>Bits</c> and
    /// <c>Route</c> output columns say what ran and why.
    /// </summary>
    public string? BudgetColumnName { get; set; }

    /// <summary>A budget no width meets: false (default) throws naming the fastest route and its cost; true runs the fastest route and says so in <c>Route</c> ("warning: …").</summary>
    public bool FastestWhenOverBudget { get; set; }

    /// <summary>Add the LogLikelihood, TokenCount and Perplexity columns (one prefill per row).</summary>
    public bool ScoreText { get; set; } = true;

    /// <summary>Tokens generated into the Completion column (0: no completion, the column holds "").</summary>
    public int CompletionTokens { get; set; }

    /// <summary>Sampling temperature for completions (0: greedy).</summary>
    public float Temperature { get; set; }

    /// <summary>Top-k for sampled completions (0: off).</summary>
    public int TopK { get; set; }

    /// <summary>Top-p for sampled completions (1: off).</summary>
    public float TopP { get; set; } = 1f;

    /// <summary>
    /// Draft width for self-speculative completions (null: off): rows read at a wider <see cref="AnyPrecisionTransformer.Bits"/>
    /// are completed by drafting at this width and verifying at Bits, over the same weights. The completions are the same
    /// (greedy) or identically distributed (sampled) as without it; at Bits ≤ DraftBits rows are decoded target-only.
    /// </summary>
    public int? DraftBits { get; set; }

    /// <summary>Most tokens drafted per speculative round (k).</summary>
    public int DraftTokens { get; set; } = 4;

    /// <summary>Sampler seed, the same for every row, so results do not depend on row order or cursors.</summary>
    public ulong Seed { get; set; } = 1;

    /// <summary>The engine Transform runs.</summary>
    public AnyPrecisionEngineKind Engine { get; set; } = AnyPrecisionEngineKind.Onnx;

    /// <summary>Receives progress of calibration and quantization during Fit, one line per step.</summary>
    public IProgress<string>? Progress { get; set; }

    internal AnyPrecisionQuantizeOptions Clone() => (AnyPrecisionQuantizeOptions)MemberwiseClone();
}
