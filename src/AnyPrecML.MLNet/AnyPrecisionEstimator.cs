using AnyPrecML.Models;
using AnyPrecML.Quantization;
using AnyPrecML.Reference;
using AnyPrecML.Tokenization;
using Microsoft.ML;
using Microsoft.ML.Data;

namespace AnyPrecML.MLNet;

/// <summary>
/// Fits an any-precision quantizer: reads calibration text from the input column, quantizes the model once into an
/// n-bit parent (or opens one that already is), and returns an <see cref="AnyPrecisionTransformer"/> serving every
/// width from seed to n. Create it with <c>mlContext.Transforms.AnyPrecisionQuantize(...)</c>.
/// </summary>
public sealed class AnyPrecisionEstimator : IEstimator<AnyPrecisionTransformer>
{
    private readonly MLContext _ml;
    private readonly AnyPrecisionQuantizeOptions _options;

    internal AnyPrecisionEstimator(MLContext ml, AnyPrecisionQuantizeOptions options)
    {
        _ml = ml ?? throw new ArgumentNullException(nameof(ml));
        ArgumentNullException.ThrowIfNull(options);
        if (string.IsNullOrWhiteSpace(options.ModelPath)) throw new ArgumentException("ModelPath names no model.", nameof(options));
        if (options.SeedBits < 1 || options.SeedBits > options.ParentBits || options.ParentBits > 8)
            throw new ArgumentOutOfRangeException(nameof(options), $"SeedBits {options.SeedBits} and ParentBits {options.ParentBits} must satisfy 1 ≤ seed ≤ parent ≤ 8.");
        if (!SensitivitySources.Kinds.Contains(options.Sensitivity))
            throw new ArgumentException($"unknown sensitivity '{options.Sensitivity}' (expected {string.Join(", ", SensitivitySources.Kinds)}).", nameof(options));
        if (options.Bits is int b && (b < options.SeedBits || b > options.ParentBits))
            throw new ArgumentOutOfRangeException(nameof(options), b, $"Bits {b} is outside {options.SeedBits}..{options.ParentBits}.");
        _options = options.Clone();
    }

    /// <summary>Quantizes (unless the model already is any-precision) and returns the transformer.</summary>
    /// <exception cref="ArgumentOutOfRangeException">The input has no text column of that name.</exception>
    public AnyPrecisionTransformer Fit(IDataView input)
    {
        ArgumentNullException.ThrowIfNull(input);
        var o = _options;
        CheckInput(input.Schema, o.InputColumnName);
        string directory;
        if (Directory.Exists(o.ModelPath) && LlamaCheckpoint.IsAnyPrecision(o.ModelPath))
        {
            directory = o.ModelPath;
            Report($"{o.ModelPath} is already an any-precision model: nothing to quantize");
        }
        else
        {
            directory = o.OutputDirectory ?? DefaultOutput(o.ModelPath);
            Quantize(input, directory);
        }
        var settings = new TransformerSettings
        {
            ModelDirectory = directory, TokenizerPath = o.TokenizerPath, InputColumnName = o.InputColumnName, Bits = o.Bits ?? 0,
            ScoreText = o.ScoreText, CompletionTokens = o.CompletionTokens, Temperature = o.Temperature, TopK = o.TopK, TopP = o.TopP,
            Seed = o.Seed, Engine = o.Engine, DraftBits = o.DraftBits, DraftTokens = o.DraftTokens,
            ProfilePath = o.ProfilePath, BudgetColumnName = o.BudgetColumnName, FastestWhenOverBudget = o.FastestWhenOverBudget,
        };
        return new AnyPrecisionTransformer(_ml, settings);
    }

    /// <summary>The input schema plus LogLikelihood, TokenCount, Perplexity and Completion.</summary>
    public SchemaShape GetOutputSchema(SchemaShape inputSchema) =>
        AnyPrecisionTransformer.BuildPipeline(_ml, _options.InputColumnName, _options.BudgetColumnName, "", static (_, _) => { }).GetOutputSchema(inputSchema);

    private void Quantize(IDataView input, string directory)
    {
        var o = _options;
        using var source = LlamaCheckpoint.Open(o.ModelPath);
        var tokenizer = LlamaTokenizerLoader.Load(source, o.TokenizerPath);
        CalibrationSet? calibration = null;
        if (o.Sensitivity != "uniform")
        {
            string text = string.Join('\n', ReadColumn(input, o.InputColumnName).Where(t => !string.IsNullOrWhiteSpace(t)));
            if (text.Length == 0) throw new ArgumentException($"column '{o.InputColumnName}' holds no calibration text; {o.Sensitivity} sensitivity needs some (or use \"uniform\").");
            calibration = CalibrationSet.FromText(tokenizer, text, o.CalibrationSamples, o.CalibrationLength, source.Config.MaxSeqLen, $"IDataView column {o.InputColumnName}");
        }
        var calibrationProgress = new Progress<(int Done, int Total)>(p => Report($"{o.Sensitivity} calibration {p.Done}/{p.Total}"));
        var (sensitivity, summary) = SensitivitySources.Create(o.Sensitivity, ReferenceEngine.FromCheckpoint(source), calibration, calibrationProgress);
        var quantizeProgress = new Progress<QuantizeProgress>(p => Report($"quantize {p.Done}/{p.Total} {p.Layer}"));
        AnyPrecisionQuantizer.Quantize(source, directory, sensitivity, new QuantizerOptions { SeedBits = o.SeedBits, ParentBits = o.ParentBits },
            summary, quantizeProgress, overwrite: true);
        Report($"wrote {directory}: {o.SeedBits}..{o.ParentBits} bits");
    }

    private void Report(string message)
    {
        _options.Progress?.Report(message);
    }

    private static void CheckInput(DataViewSchema schema, string column)
    {
        var c = schema.GetColumnOrNull(column)
            ?? throw new ArgumentOutOfRangeException(nameof(column), column, $"the input has no column '{column}' (it has: {string.Join(", ", schema.Select(x => x.Name))}).");
        if (c.Type is not TextDataViewType) throw new ArgumentException($"column '{column}' is {c.Type}, not text.", nameof(column));
    }

    private static IEnumerable<string> ReadColumn(IDataView input, string column)
    {
        var col = input.Schema[column];
        using var cursor = input.GetRowCursor([col]);
        var getter = cursor.GetGetter<ReadOnlyMemory<char>>(col);
        ReadOnlyMemory<char> value = default;
        while (cursor.MoveNext())
        {
            getter(ref value);
            yield return value.ToString();
        }
    }

    /// <summary>stories260K.bin → stories260K.anyprec beside it; a directory d → d.anyprec.</summary>
    private static string DefaultOutput(string modelPath)
    {
        string full = Path.GetFullPath(modelPath).TrimEnd(Path.DirectorySeparatorChar);
        return Directory.Exists(full) ? full + ".anyprec" : Path.Combine(Path.GetDirectoryName(full)!, Path.GetFileNameWithoutExtension(full) + ".anyprec");
    }
}
