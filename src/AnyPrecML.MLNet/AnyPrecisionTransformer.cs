using System.Text.Json;
using AnyPrecML.Evaluation;
using AnyPrecML.Generation;
using AnyPrecML.Models;
using AnyPrecML.Onnx;
using AnyPrecML.Quantization;
using AnyPrecML.Tokenization;
using Microsoft.ML;
using Microsoft.ML.Data;
using Microsoft.ML.Tokenizers;
using Microsoft.ML.Transforms;

namespace AnyPrecML.MLNet;

/// <summary>
/// The fitted any-precision model in an ML.NET pipeline. <see cref="Transform"/> is lazy and streaming: for each row of
/// the text column it adds <c>LogLikelihood</c> (float: the summed log-probability of the text's tokens after BOS),
/// <c>TokenCount</c> (int: tokens scored), <c>Perplexity</c> (float) and <c>Completion</c> (text), computed at
/// <see cref="Bits"/> when the row is read. Parallel cursors and <c>PredictionEngine</c> work.
/// </summary>
/// <remarks>
/// Defined values: an empty or missing text has TokenCount 0, LogLikelihood 0 and Perplexity NaN, and its completion
/// starts from BOS. A text longer than the context is scored in non-overlapping windows of the context (as
/// <c>anyprec perplexity</c>); a prompt that leaves no room to generate gets the completion "".
/// Saving: <c>mlContext.Model.Save</c> stores a CustomMapping (contract <see cref="ContractName"/>) and writes this
/// transformer's settings into the model directory (mlnet-transform.json). To load, name that directory first with
/// <see cref="RegisterForLoading"/>; the loaded pipeline is an ordinary ITransformer giving identical outputs.
/// </remarks>
public sealed class AnyPrecisionTransformer : ITransformer, IDisposable
{
    /// <summary>The CustomMapping contract name saved in ML.NET model files.</summary>
    public const string ContractName = "AnyPrecML.AnyPrecision";

    /// <summary>Settings file written into the model directory when a pipeline is saved.</summary>
    public const string SettingsFileName = "mlnet-transform.json";

    /// <summary>Column the mapping reads (a copy of the input column, dropped after the mapping).</summary>
    internal const string MappingInputColumn = "AnyPrecisionText";

    private readonly AnyPrecisionScorer _scorer;
    private readonly ITransformer _inner;

    internal AnyPrecisionTransformer(MLContext ml, TransformerSettings settings)
    {
        _scorer = new AnyPrecisionScorer(settings);
        _inner = BuildPipeline(ml, settings.InputColumnName, _scorer.Map).Fit(EmptyInput(ml, settings.InputColumnName));
    }

    /// <summary>Width used by <see cref="Transform"/> for rows read from now on; validated against seed..n.</summary>
    /// <exception cref="ArgumentOutOfRangeException">The model does not serve that width.</exception>
    public int Bits
    {
        get => _scorer.Bits;
        set => _scorer.Bits = value;
    }

    /// <summary>Every width the model serves: seed..n.</summary>
    public IReadOnlyList<int> SupportedBits => _scorer.Model.SupportedBits;

    /// <summary>Parent width n.</summary>
    public int ParentBits => _scorer.Model.ParentBits;

    /// <summary>Seed width.</summary>
    public int SeedBits => _scorer.Model.SeedBits;

    /// <summary>The any-precision model (its directory, configuration and layers).</summary>
    public AnyPrecisionModel Model => _scorer.Model;

    /// <summary>The directory the model was read from.</summary>
    public string ModelDirectory => _scorer.Settings.ModelDirectory;

    /// <inheritdoc/>
    public bool IsRowToRowMapper => _inner.IsRowToRowMapper;

    /// <inheritdoc/>
    public DataViewSchema GetOutputSchema(DataViewSchema inputSchema) => _inner.GetOutputSchema(inputSchema);

    /// <inheritdoc/>
    public IRowToRowMapper GetRowToRowMapper(DataViewSchema inputSchema) => _inner.GetRowToRowMapper(inputSchema);

    /// <inheritdoc/>
    public IDataView Transform(IDataView input) => _inner.Transform(input);

    /// <summary>Saves the pipeline part through ML.NET and the settings into the model directory (temporary file, then rename).</summary>
    void ICanSaveModel.Save(ModelSaveContext ctx)
    {
        AtomicFile.Write(Path.Combine(ModelDirectory, SettingsFileName), s => JsonSerializer.Serialize(s, _scorer.Settings with { Bits = Bits }));
        ((ICanSaveModel)_inner).Save(ctx);
    }

    /// <summary>Closes the engine and the model.</summary>
    public void Dispose() => _scorer.Dispose();

    private static volatile string? s_loadDirectory;

    /// <summary>
    /// Names the any-precision directory a saved pipeline's transform is read from when <c>mlContext.Model.Load</c>
    /// meets it (its settings are the mlnet-transform.json saved there).
    /// </summary>
    public static void RegisterForLoading(string modelDirectory)
    {
        ArgumentException.ThrowIfNullOrEmpty(modelDirectory);
        s_loadDirectory = Path.GetFullPath(modelDirectory);
    }

    /// <summary>The mapping of a pipeline being loaded: settings from the registered directory, a fresh engine.</summary>
    internal static Action<AnyPrecisionInput, AnyPrecisionOutput> MappingForLoad()
    {
        string dir = s_loadDirectory ?? throw new InvalidOperationException(
            $"this pipeline contains an AnyPrecML transform: call AnyPrecisionTransformer.RegisterForLoading(<any-precision model directory>) before mlContext.Model.Load.");
        if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"the any-precision model directory '{dir}' the pipeline needs is missing.");
        string path = Path.Combine(dir, SettingsFileName);
        if (!File.Exists(path)) throw new FileNotFoundException($"'{path}' is missing: it is written when a pipeline with this model is saved.", path);
        var settings = JsonSerializer.Deserialize<TransformerSettings>(File.ReadAllText(path))
            ?? throw new InvalidDataException($"'{path}' holds no settings.");
        // Loaded pipelines keep their engine for the life of the process (ML.NET has no disposal hook for them).
        return new AnyPrecisionScorer(settings with { ModelDirectory = dir }).Map;
    }

    internal static IEstimator<ITransformer> BuildPipeline(MLContext ml, string inputColumn, Action<AnyPrecisionInput, AnyPrecisionOutput> map) =>
        ml.Transforms.CopyColumns(MappingInputColumn, inputColumn)
            .Append(ml.Transforms.CustomMapping(map, ContractName))
            .Append(ml.Transforms.DropColumns(MappingInputColumn));

    private static IDataView EmptyInput(MLContext ml, string inputColumn)
    {
        var definition = SchemaDefinition.Create(typeof(AnyPrecisionInput));
        definition[0].ColumnName = inputColumn;
        return ml.Data.LoadFromEnumerable(Array.Empty<AnyPrecisionInput>(), definition);
    }
}

/// <summary>The text a row gives the mapping.</summary>
public sealed class AnyPrecisionInput
{
    /// <summary>The row's text (null is read as empty).</summary>
    [ColumnName(AnyPrecisionTransformer.MappingInputColumn)]
    public string? Text { get; set; }
}

/// <summary>The columns the transform adds.</summary>
public sealed class AnyPrecisionOutput
{
    /// <summary>Σ log p(token) over the scored tokens (natural log); 0 for an empty text.</summary>
    public float LogLikelihood { get; set; }
    /// <summary>Tokens scored (every token after the first of each window).</summary>
    public int TokenCount { get; set; }
    /// <summary>exp(−LogLikelihood / TokenCount); NaN for an empty text.</summary>
    public float Perplexity { get; set; }
    /// <summary>Generated continuation ("" when completions are off).</summary>
    public string Completion { get; set; } = "";
}

/// <summary>Lets ML.NET find the mapping when it loads a saved pipeline.</summary>
[CustomMappingFactoryAttribute(AnyPrecisionTransformer.ContractName)]
public sealed class AnyPrecisionMappingFactory : CustomMappingFactory<AnyPrecisionInput, AnyPrecisionOutput>
{
    /// <inheritdoc/>
    public override Action<AnyPrecisionInput, AnyPrecisionOutput> GetMapping() => AnyPrecisionTransformer.MappingForLoad();
}

/// <summary>What a transformer needs to be rebuilt: saved as JSON beside the model.</summary>
internal sealed record TransformerSettings
{
    public required string ModelDirectory { get; init; }
    public string? TokenizerPath { get; init; }
    public string InputColumnName { get; init; } = "Text";
    public int Bits { get; init; }
    public bool ScoreText { get; init; } = true;
    public int CompletionTokens { get; init; }
    public float Temperature { get; init; }
    public int TopK { get; init; }
    public float TopP { get; init; } = 1f;
    public ulong Seed { get; init; } = 1;
    public AnyPrecisionEngineKind Engine { get; init; }
    public int? DraftBits { get; init; }
    public int DraftTokens { get; init; } = 4;
}

/// <summary>The engine side of the transform: scores and completes one text at the current width; safe on many threads.</summary>
internal sealed class AnyPrecisionScorer : IDisposable
{
    private readonly IAnyPrecisionEngine _engine;
    private readonly Tokenizer _tokenizer;
    private readonly GenerationOptions _generation;
    private volatile int _bits;

    public AnyPrecisionScorer(TransformerSettings settings)
    {
        Model = AnyPrecisionModel.Open(settings.ModelDirectory);
        try
        {
            _bits = Model.CheckBits(settings.Bits == 0 ? Model.ParentBits : settings.Bits);
            _tokenizer = LlamaTokenizerLoader.Load(Model.Checkpoint, settings.TokenizerPath);
            _generation = new GenerationOptions
            {
                MaxTokens = settings.CompletionTokens, Temperature = settings.Temperature, TopK = settings.TopK, TopP = settings.TopP, Seed = settings.Seed,
                DraftTokens = settings.DraftTokens,
            }.Validated();
            if (settings.DraftBits is int d) Model.CheckBits(d);
            _engine = settings.Engine == AnyPrecisionEngineKind.Onnx ? new OnnxEngine(Model, new OnnxEngineOptions { Bits = _bits }) : new AnyPrecisionReferenceEngine(Model, _bits);
        }
        catch
        {
            Model.Dispose();
            throw;
        }
        Settings = settings with { ModelDirectory = Path.GetFullPath(settings.ModelDirectory) };
    }

    public TransformerSettings Settings { get; }
    public AnyPrecisionModel Model { get; }

    public int Bits
    {
        get => _bits;
        set => _bits = Model.CheckBits(value);
    }


    public void Map(AnyPrecisionInput input, AnyPrecisionOutput output)
    {
        string text = input.Text ?? "";
        int bits = _bits;
        var engine = new FixedWidth(_engine, bits);
        // BOS + the text's tokens, once: scored, and measured against the context before generating.
        var tokens = text.Length == 0 ? [] : PerplexityEvaluator.Tokenize(_tokenizer, text, bosPerLine: false);
        (output.TokenCount, output.LogLikelihood, output.Perplexity) = (0, 0f, float.NaN);
        if (Settings.ScoreText && tokens.Count >= 2)
        {
            var r = PerplexityEvaluator.Evaluate(engine, tokens);
            output.TokenCount = (int)r.Tokens;
            output.LogLikelihood = (float)(-r.Nll * r.Tokens);
            output.Perplexity = (float)r.Perplexity;
        }
        output.Completion = _generation.MaxTokens > 0 && tokens.Count < Model.Config.MaxSeqLen
            ? new TextGenerator(engine, _tokenizer).Generate(text, Settings.DraftBits < bits ? _generation with { DraftBits = Settings.DraftBits } : _generation).Text
            : "";
    }

    public void Dispose()
    {
        _engine.Dispose();
        Model.Dispose();
    }

    /// <summary>The shared engine pinned to one width for one row (so a Bits change mid-row cannot mix widths).</summary>
    private sealed class FixedWidth(IAnyPrecisionEngine engine, int bits) : IAnyPrecisionEngine
    {
        public LlamaConfig Config => engine.Config;
        public int SeedBits => engine.SeedBits;
        public int ParentBits => engine.ParentBits;
        public int Bits { get => bits; set => throw new InvalidOperationException("this row's engine is pinned to one width."); }
        public KvCache CreateCache(int capacity = 0) => engine.CreateCache(capacity);
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits) => engine.Forward(tokens, cache, logits, bits);
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, int width) => engine.Forward(tokens, cache, logits, width);
        public void Dispose() { }
    }
}
