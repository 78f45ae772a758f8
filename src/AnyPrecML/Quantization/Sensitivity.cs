using AnyPrecML.Models;
using AnyPrecML.Reference;
using Microsoft.ML.Tokenizers;

namespace AnyPrecML.Quantization;

/// <summary>
/// The sensitivity of each weight of one linear layer: how much the loss cares about its error.
/// Either one value per input column, shared by every row (the activation-Hessian diagonal), or one
/// per weight (the Fisher diagonal).
/// </summary>
public sealed class LayerSensitivity
{
    private readonly float[] _values;

    private LayerSensitivity(float[] values, int rows, int cols, bool perColumn) { _values = values; Rows = rows; Cols = cols; PerColumn = perColumn; }

    /// <summary>Output rows of the layer.</summary>
    public int Rows { get; }
    /// <summary>Input columns of the layer.</summary>
    public int Cols { get; }
    /// <summary>True when every row shares one vector of <see cref="Cols"/> values.</summary>
    public bool PerColumn { get; }

    /// <summary>One value per column, shared by all rows.</summary>
    public static LayerSensitivity Columns(float[] values, int rows) => new(values, rows, values.Length, true);
    /// <summary>One value per weight, row-major [rows, cols].</summary>
    public static LayerSensitivity Weights(float[] values, int rows, int cols) =>
        values.Length == (long)rows * cols ? new(values, rows, cols, false) : throw new ArgumentException($"{values.Length} values for a {rows}×{cols} layer.");
    /// <summary>All ones.</summary>
    public static LayerSensitivity Uniform(int rows, int cols) => Columns(Enumerable.Repeat(1f, cols).ToArray(), rows);

    /// <summary>The sensitivities of row <paramref name="row"/>.</summary>
    public ReadOnlySpan<float> Row(int row) => PerColumn ? _values : _values.AsSpan(row * Cols, Cols);
}

/// <summary>A source of per-layer sensitivities; Fisher, the activation-Hessian diagonal and uniform plug in here.</summary>
public interface ISensitivitySource
{
    /// <summary>"uniform", "hessian" or "fisher": recorded in the quantized model.</summary>
    string Kind { get; }

    /// <summary>The sensitivity of linear <paramref name="part"/> of block <paramref name="layer"/> ([rows, cols] weight).</summary>
    LayerSensitivity For(int layer, string part, int rows, int cols);
}

/// <summary>Every weight equally sensitive: plain k-means.</summary>
public sealed class UniformSensitivity : ISensitivitySource
{
    /// <inheritdoc/>
    public string Kind => "uniform";
    /// <inheritdoc/>
    public LayerSensitivity For(int layer, string part, int rows, int cols) => LayerSensitivity.Uniform(rows, cols);
}

/// <summary>Calibration documents as token sequences: what a sensitivity source runs the model on.</summary>
/// <param name="Sequences">One token sequence per document, BOS first.</param>
/// <param name="Source">Where the text came from (recorded in the model).</param>
/// <param name="SequenceLength">The truncation length: no sequence is longer.</param>
public sealed record CalibrationSet(IReadOnlyList<int[]> Sequences, string Source, int SequenceLength)
{
    /// <summary>Tokens in all sequences.</summary>
    public long Tokens => Sequences.Sum(s => (long)s.Length);

    /// <summary>
    /// One line = one document = one sequence: each non-empty line of <paramref name="text"/> is tokenized
    /// with BOS first and truncated to its first <paramref name="sequenceLength"/> tokens (capped by the
    /// model's context); the first <paramref name="samples"/> documents of two or more tokens are kept.
    /// No sequence starts mid-document and none spans two.
    /// </summary>
    public static CalibrationSet FromText(Tokenizer tokenizer, string text, int samples, int sequenceLength, int maxSeqLen, string source)
    {
        if (string.IsNullOrWhiteSpace(text)) throw new ArgumentException("the calibration text is empty.", nameof(text));
        ArgumentOutOfRangeException.ThrowIfLessThan(samples, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(sequenceLength, 2);
        int len = Math.Min(sequenceLength, maxSeqLen);
        var seqs = Evaluation.PerplexityEvaluator.Documents(tokenizer, text, len).Where(d => d.Length >= 2).Take(samples).ToList();
        if (seqs.Count == 0) throw new ArgumentException("the calibration text has no document of two or more tokens.", nameof(text));
        return new CalibrationSet(seqs, source, len);
    }
}

/// <summary>
/// The diagonal of each layer's input Hessian (GPTQ/SqueezeLLM's proxy without gradients):
/// s_j = mean over calibration tokens of x_j², shared by every row of the layer. Needs forward passes only.
/// </summary>
public sealed class HessianDiagonalSensitivity : ISensitivitySource, ILinearInputObserver
{
    private readonly Dictionary<(int, string), double[]> _sums = [];
    private long _tokens;

    private HessianDiagonalSensitivity() { }

    /// <inheritdoc/>
    public string Kind => "hessian";

    /// <summary>Runs <paramref name="engine"/> over <paramref name="calibration"/> and collects the statistics.</summary>
    public static HessianDiagonalSensitivity Collect(ReferenceEngine engine, CalibrationSet calibration, IProgress<(int Done, int Total)>? progress = null, CancellationToken cancellationToken = default)
    {
        if (calibration.Sequences.Count == 0) throw new ArgumentException("the calibration set has no sequences.", nameof(calibration));
        var h = new HessianDiagonalSensitivity();
        var previous = engine.Observer;
        engine.Observer = h;
        try
        {
            var logits = new float[engine.Config.VocabSize];
            for (int i = 0; i < calibration.Sequences.Count; i++)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var seq = calibration.Sequences[i];
                engine.Forward(seq, engine.CreateCache(seq.Length), logits);
                h._tokens += seq.Length;
                progress?.Report((i + 1, calibration.Sequences.Count));
            }
        }
        finally { engine.Observer = previous; }
        return h;
    }

    void ILinearInputObserver.Observe(int layer, string part, ReadOnlySpan<float> input, int tokens, int cols)
    {
        if (!_sums.TryGetValue((layer, part), out var sum)) _sums[(layer, part)] = sum = new double[cols];
        for (int t = 0; t < tokens; t++)
        {
            var row = input.Slice(t * cols, cols);
            for (int j = 0; j < cols; j++) sum[j] += (double)row[j] * row[j];
        }
    }

    /// <inheritdoc/>
    public LayerSensitivity For(int layer, string part, int rows, int cols)
    {
        if (!_sums.TryGetValue((layer, part), out var sum) || sum.Length != cols)
            throw new InvalidOperationException($"no activation statistics for layer {layer} {part} with {cols} inputs.");
        return LayerSensitivity.Columns(Array.ConvertAll(sum, s => (float)(s / _tokens)), rows);
    }
}

/// <summary>Builds the sensitivity source named on the command line or in options.</summary>
public static class SensitivitySources
{
    /// <summary>The kinds this build knows.</summary>
    public static readonly string[] Kinds = ["fisher", "hessian", "uniform"];

    /// <summary>
    /// Creates the <paramref name="kind"/> source for <paramref name="engine"/>: "uniform" needs nothing,
    /// "hessian" runs the calibration set forward, "fisher" forward and backward. Returns the source
    /// and a summary of the calibration to record.
    /// </summary>
    public static (ISensitivitySource Source, System.Text.Json.Nodes.JsonObject? Summary) Create(string kind, ReferenceEngine engine, CalibrationSet? calibration,
        IProgress<(int Done, int Total)>? progress = null, CancellationToken cancellationToken = default)
    {
        switch (kind)
        {
            case "uniform":
                return (new UniformSensitivity(), null);
            case "hessian" or "fisher":
                if (calibration is null) throw new ArgumentException($"the {kind} sensitivity needs calibration text.", nameof(calibration));
                var summary = new System.Text.Json.Nodes.JsonObject
                {
                    ["source"] = calibration.Source,
                    ["framing"] = "documents",
                    ["samples"] = calibration.Sequences.Count,
                    ["seq_len"] = calibration.SequenceLength,
                    ["tokens"] = calibration.Tokens,
                };
                ISensitivitySource source = kind == "hessian"
                    ? HessianDiagonalSensitivity.Collect(engine, calibration, progress, cancellationToken)
                    : FisherSensitivity.Collect(engine.Weights, calibration, progress, cancellationToken);
                return (source, summary);
            default:
                throw new ArgumentException($"unknown sensitivity '{kind}'; known: {string.Join(", ", Kinds)}.", nameof(kind));
        }
    }
}

/// <summary>
/// The diagonal Fisher information of each block linear weight (SqueezeLLM, Any-Precision LLM):
/// the sum over calibration sequences of the squared gradient of that sequence's mean next-token
/// cross-entropy, one backward pass per sequence (batch size 1, as the official code).
/// Memory: one fp32 accumulator per quantized weight, plus one sequence's activations.
/// </summary>
public sealed class FisherSensitivity : ISensitivitySource
{
    private readonly Dictionary<(int, string), float[]> _sums;

    private FisherSensitivity(Dictionary<(int, string), float[]> sums, double meanLoss) { _sums = sums; MeanLoss = meanLoss; }

    /// <inheritdoc/>
    public string Kind => "fisher";

    /// <summary>Mean calibration loss (nats per token) seen while collecting.</summary>
    public double MeanLoss { get; }

    /// <summary>Runs one backward pass per calibration sequence over <paramref name="weights"/> and sums the squared gradients.</summary>
    public static FisherSensitivity Collect(LlamaWeights weights, CalibrationSet calibration, IProgress<(int Done, int Total)>? progress = null, CancellationToken cancellationToken = default)
    {
        var sequences = calibration.Sequences.Where(s => s.Length >= 2).ToList();
        if (sequences.Count == 0) throw new ArgumentException("the calibration set has no sequence of two or more tokens.", nameof(calibration));
        var pass = new LlamaBackward<float>(weights);
        var sums = new Dictionary<(int, string), float[]>();
        double loss = 0;
        for (int i = 0; i < sequences.Count; i++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            loss += pass.Gradients(sequences[i], (layer, part, grad) =>
            {
                if (!sums.TryGetValue((layer, part), out var acc)) sums[(layer, part)] = acc = new float[grad.Length];
                System.Numerics.Tensors.TensorPrimitives.MultiplyAdd(grad, grad, acc, acc);
            });
            progress?.Report((i + 1, sequences.Count));
        }
        return new FisherSensitivity(sums, loss / sequences.Count);
    }

    /// <inheritdoc/>
    public LayerSensitivity For(int layer, string part, int rows, int cols)
    {
        if (!_sums.TryGetValue((layer, part), out var s) || s.Length != (long)rows * cols)
            throw new InvalidOperationException($"no Fisher information for layer {layer} {part} of {rows}×{cols}.");
        return LayerSensitivity.Weights(s, rows, cols);
    }
}
