using AnyPrecML.Models;
using AnyPrecML.Quantization;
using AnyPrecML.Reference;

namespace AnyPrecML.Evaluation;

/// <summary>Perplexity at one bit-width: the any-precision model and, when asked, the separate-deployment baselines.</summary>
public sealed record QualityRow(int Bits, double AnyPrecision, double? Independent, double? Rtn);

/// <summary>The paper's main table on one model and text: perplexity against bits.</summary>
public sealed record QualityReport(double Fp32, IReadOnlyList<QualityRow> Rows, long Tokens, int ContextLength);

/// <summary>Progress of a quality evaluation: models evaluated of the total, and which.</summary>
public readonly record struct QualityProgress(int Done, int Total, string What);

/// <summary>
/// Evaluates an any-precision model at every width against fp32 and, optionally, against what
/// separate deployment would ship at each width: each width clustered on its own with 2^b centroids
/// by the exact weighted 1-D k-means ("independent": the best separate non-uniform model for the
/// objective) and per-row min-max round-to-nearest ("RTN"). Every b-bit model is evaluated by
/// dequantizing through its centroid tables into the reference engine: exact and simple.
/// </summary>
public static class QualityEvaluator
{
    /// <summary>Runs the evaluation over <paramref name="sequences"/>, each from an empty cache.</summary>
    /// <param name="model">The any-precision model.</param>
    /// <param name="original">The checkpoint it was quantized from (fp32 column and baselines).</param>
    /// <param name="sequences">Windows of a stream (<see cref="PerplexityEvaluator.Windows"/>) or documents (<see cref="PerplexityEvaluator.Documents(Microsoft.ML.Tokenizers.Tokenizer, string, int)"/>).</param>
    /// <param name="baselineSensitivity">Sensitivity for the independent baseline (the one the model was quantized with); null skips the baselines.</param>
    /// <param name="randomSeed">Seed of the independent baseline's k-means++ (only with <paramref name="independentMethod"/> kmeans).</param>
    /// <param name="independentMethod">How each width is clustered on its own: exact (default, the strongest independent model) or kmeans.</param>
    /// <param name="progress">Models evaluated.</param>
    /// <param name="cancellationToken">Stops between windows.</param>
    public static QualityReport Evaluate(AnyPrecisionModel model, LlamaCheckpoint original, IReadOnlyList<int[]> sequences,
        ISensitivitySource? baselineSensitivity, ulong randomSeed = 0, SeedMethod independentMethod = SeedMethod.Exact, IProgress<QualityProgress>? progress = null, CancellationToken cancellationToken = default)
    {
        var c = original.Config;
        var bits = model.SupportedBits;
        int total = 1 + bits.Count * (baselineSensitivity is null ? 1 : 3), done = 0;
        double Ppl(LlamaWeights w, string what)
        {
            var r = PerplexityEvaluator.EvaluateSequences(new ReferenceEngine(w), sequences, null, cancellationToken);
            progress?.Report(new QualityProgress(++done, total, what));
            return r.Perplexity;
        }

        var fp32 = PerplexityEvaluator.EvaluateSequences(ReferenceEngine.FromCheckpoint(original), sequences, null, cancellationToken);
        progress?.Report(new QualityProgress(++done, total, "fp32"));
        var rows = new List<QualityRow>();
        foreach (int b in bits)
        {
            double ap = Ppl(model.ToWeights(b), $"any-precision {b}-bit");
            double? independent = null, rtn = null;
            if (baselineSensitivity is not null)
            {
                independent = Ppl(BaselineWeights(original, (l, part, w, rowsN, cols) =>
                    Baselines.Independent(w, rowsN, cols, AnyPrecisionQuantizer.SensitivityInHfOrder(c, part, baselineSensitivity.For(l, part, rowsN, cols)), b,
                        SplitMix64.Derive(randomSeed, (ulong)(l * 7 + Array.IndexOf(LlamaTensorNames.BlockLinears, part))), independentMethod)), $"independent {b}-bit");
                rtn = Ppl(BaselineWeights(original, (l, part, w, rowsN, cols) => Baselines.RoundToNearest(w, rowsN, cols, b)), $"RTN {b}-bit");
            }
            rows.Add(new QualityRow(b, ap, independent, rtn));
        }
        return new QualityReport(fp32.Perplexity, rows, fp32.Tokens, fp32.ContextLength);
    }

    /// <summary>fp32 weights of <paramref name="original"/> with every block linear replaced by <paramref name="quantize"/>(layer, part, weight in HF row order, rows, cols).</summary>
    private static LlamaWeights BaselineWeights(LlamaCheckpoint original, Func<int, string, float[], int, int, float[]> quantize)
    {
        var c = original.Config;
        // The checkpoint's own linears may be in llama2.c order; the engine runs HF order here, so both the
        // quantized linears and the RoPE pairing follow HF.
        var weights = LlamaWeights.FromCheckpoint(original, (l, part) =>
        {
            var shape = LlamaTensorNames.ShapeOf(c, part);
            return quantize(l, part, AnyPrecisionQuantizer.SourceWeight(original, l, part), (int)shape[0], (int)shape[1]);
        });
        return new LlamaWeights
        {
            Config = c with { RopeLayout = RopeLayout.HalfSplit },
            Embedding = weights.Embedding, Blocks = weights.Blocks, FinalNorm = weights.FinalNorm, Head = weights.Head,
        };
    }
}
