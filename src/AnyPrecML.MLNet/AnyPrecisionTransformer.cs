using System.Collections.Concurrent;
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
/// <see cref="Bits"/> (or <see cref="Profile"/>, or the width the router picks for the row's budget) when the row is
/// read, and <c>Bits</c> (float: the width, or a profile's average), <c>DraftBits</c> and <c>Route</c> saying what ran. Parallel cursors and <c>PredictionEngine</c> work.
/// </summary>
/// <remarks>
/// Defined values: an empty or missing text has TokenCount 0, LogLikelihood 0 and Perplexity NaN, and its completion
/// starts from BOS. A text longer than the context is scored in non-overlapping windows of the context (as
/// <c>anyprec perplexity</c>); a prompt that leaves no room to generate gets the completion "".
/// Saving: <c>mlContext.Model.Save</c> stores a CustomMapping (contract <see cref="ContractName"/>) after an Expression
/// column holding this transformer's settings at save time: the model directory, the model's content SHA-256 and the
/// width. <c>mlContext.Model.Load</c> needs nothing else; the loaded pipeline opens the model when its first row is
/// read, refuses a directory whose content no longer has that hash, and gives outputs identical to the saved
/// transformer's. Any number of loaded pipelines (other models, other widths) work side by side.
/// </remarks>
public sealed class AnyPrecisionTransformer : ITransformer, IDisposable
{
    /// <summary>The CustomMapping contract name saved in ML.NET model files.</summary>
    public const string ContractName = "AnyPrecML.AnyPrecision";

    /// <summary>Column the mapping reads (a copy of the input column, dropped after the mapping).</summary>
    internal const string MappingInputColumn = "AnyPrecisionText";

    /// <summary>Column holding the saved settings (a constant, dropped after the mapping).</summary>
    internal const string SettingsColumn = "AnyPrecisionSettings";

    /// <summary>Column the mapping reads a row's latency budget from (the budget column as float, or −1 without one; dropped after the mapping).</summary>
    internal const string MappingBudgetColumn = "AnyPrecisionBudget";

    private readonly MLContext _ml;
    private readonly AnyPrecisionScorer _scorer;
    private readonly ITransformer _inner;

    internal AnyPrecisionTransformer(MLContext ml, TransformerSettings settings)
    {
        _ml = ml;
        _scorer = new AnyPrecisionScorer(settings);
        _inner = BuildPipeline(ml, settings.InputColumnName, settings.BudgetColumnName, "", _scorer.Map).Fit(EmptyInput(ml, settings.InputColumnName, settings.BudgetColumnName));
    }

    /// <summary>Width used by <see cref="Transform"/> for rows read from now on; validated against seed..n.</summary>
    /// <exception cref="ArgumentOutOfRangeException">The model does not serve that width.</exception>
    public int Bits
    {
        get => _scorer.Bits;
        set => _scorer.Bits = value;
    }

    /// <summary>
    /// Per-linear widths rows are read at from now on (null: every linear at <see cref="Bits"/>); setting <see cref="Bits"/> clears it.
    /// </summary>
    /// <exception cref="ArgumentException">The profile is not one of this model's.</exception>
    public PrecisionProfile? Profile
    {
        get => _scorer.Profile;
        set => _scorer.Profile = value;
    }

    /// <summary>Every width the model serves: seed..n.</summary>
    public IReadOnlyList<int> SupportedBits => _scorer.Model.SupportedBits;

    /// <summary>Why the ONNX engine runs on the CPU although the CUDA provider was there (missing CUDA libraries); null when it did not fall back.</summary>
    public string? DeviceFallback => _scorer.DeviceFallback;

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

    /// <summary>
    /// Saves, through ML.NET, the pipeline with its settings at this moment (width included) and the model's content
    /// hash as a constant column; nothing is written beside the model, so saving never changes what another zip loads.
    /// </summary>
    void ICanSaveModel.Save(ModelSaveContext ctx)
    {
        var saved = new SavedSettings(_scorer.Settings with { Bits = Bits, ProfileWidths = Profile?.Widths.ToArray() }, _scorer.ContentHash);
        string encoded = Convert.ToBase64String(JsonSerializer.SerializeToUtf8Bytes(saved));
        var s = _scorer.Settings;
        var pipeline = BuildPipeline(_ml, s.InputColumnName, s.BudgetColumnName, encoded, MapSaved).Fit(EmptyInput(_ml, s.InputColumnName, s.BudgetColumnName));
        ((ICanSaveModel)pipeline).Save(ctx);
    }

    /// <summary>Closes the engine and the model.</summary>
    public void Dispose() => _scorer.Dispose();

    // Loaded pipelines by their saved settings: each distinct (model, hash, width, options) opens its model once and
    // keeps it for the life of the process (ML.NET has no disposal hook for loaded pipelines).
    private static readonly ConcurrentDictionary<string, Lazy<AnyPrecisionScorer>> s_loaded = new(StringComparer.Ordinal);

    /// <summary>The mapping of a loaded pipeline: the row carries the saved settings, which select (and on first use open and check) the model.</summary>
    internal static void MapSaved(AnyPrecisionInput input, AnyPrecisionOutput output)
    {
        string key = input.Settings ?? "";
        var scorer = s_loaded.GetOrAdd(key, k => new Lazy<AnyPrecisionScorer>(() => OpenSaved(k)));
        try
        {
            scorer.Value.Map(input, output);
        }
        catch when (!scorer.IsValueCreated)
        {
            s_loaded.TryRemove(new KeyValuePair<string, Lazy<AnyPrecisionScorer>>(key, scorer)); // a fixed directory is retried
            throw;
        }
    }

    private static AnyPrecisionScorer OpenSaved(string encoded)
    {
        SavedSettings? saved;
        try { saved = JsonSerializer.Deserialize<SavedSettings>(Convert.FromBase64String(encoded)); }
        catch (Exception e) when (e is FormatException or JsonException) { throw new InvalidDataException("the AnyPrecML settings saved in this pipeline are damaged.", e); }
        if (saved?.Settings is null || saved.ModelSha256 is null) throw new InvalidDataException("the AnyPrecML settings saved in this pipeline are incomplete.");
        string dir = saved.Settings.ModelDirectory;
        if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"{dir}: the any-precision model directory this pipeline was saved with is missing.");
        string now = AnyPrecisionModel.ContentHash(dir);
        if (now != saved.ModelSha256)
            throw new InvalidDataException($"{dir}: the model there is not the one this pipeline was saved with (content SHA-256 {now[..12]}…, saved {saved.ModelSha256[..12]}…); save the pipeline again with this model.");
        return new AnyPrecisionScorer(saved.Settings);
    }

    internal static IEstimator<ITransformer> BuildPipeline(MLContext ml, string inputColumn, string? budgetColumn, string savedSettings, Action<AnyPrecisionInput, AnyPrecisionOutput> map) =>
        ml.Transforms.Expression(SettingsColumn, $"x => \"{savedSettings}\"", inputColumn)
            .Append(ml.Transforms.CopyColumns(MappingInputColumn, inputColumn))
            .Append<ITransformer>(budgetColumn is null
                ? ml.Transforms.Expression(MappingBudgetColumn, "x => -1.0", inputColumn)
                : ml.Transforms.Conversion.ConvertType(MappingBudgetColumn, budgetColumn, DataKind.Single))
            .Append(ml.Transforms.CustomMapping(map, ContractName))
            .Append(ml.Transforms.DropColumns(MappingInputColumn, SettingsColumn, MappingBudgetColumn));

    private static IDataView EmptyInput(MLContext ml, string inputColumn, string? budgetColumn)
    {
        var definition = SchemaDefinition.Create(typeof(TextAndBudget));
        definition[0].ColumnName = inputColumn;
        if (budgetColumn is null) definition.RemoveAt(1);
        else definition[1].ColumnName = budgetColumn;
        return ml.Data.LoadFromEnumerable(Array.Empty<TextAndBudget>(), definition);
    }

    private sealed class TextAndBudget
    {
        public string? Text { get; set; }
        public float Budget { get; set; }
    }
}

/// <summary>The text a row gives the mapping.</summary>
public sealed class AnyPrecisionInput
{
    /// <summary>The row's text (null is read as empty).</summary>
    [ColumnName(AnyPrecisionTransformer.MappingInputColumn)]
    public string? Text { get; set; }

    /// <summary>The saved settings (base64 JSON) of a saved pipeline; empty in a fitted one.</summary>
    [ColumnName(AnyPrecisionTransformer.SettingsColumn)]
    public string? Settings { get; set; }

    /// <summary>The row's latency budget in ms per token (NaN or ≤ 0: none).</summary>
    [ColumnName(AnyPrecisionTransformer.MappingBudgetColumn)]
    public float Budget { get; set; }
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
    /// <summary>Bits per weight the row ran at: its width, or a precision profile's average.</summary>
    public float Bits { get; set; }
    /// <summary>Why the row ran at that width when it had a latency budget ("" without one; "warning: …" when over budget by option).</summary>
    public string Route { get; set; } = "";
    /// <summary>Draft width the row's completion was drafted at (0: none).</summary>
    public int DraftBits { get; set; }
}

/// <summary>Lets ML.NET find the mapping when it loads a saved pipeline.</summary>
[CustomMappingFactoryAttribute(AnyPrecisionTransformer.ContractName)]
public sealed class AnyPrecisionMappingFactory : CustomMappingFactory<AnyPrecisionInput, AnyPrecisionOutput>
{
    /// <inheritdoc/>
    public override Action<AnyPrecisionInput, AnyPrecisionOutput> GetMapping() => AnyPrecisionTransformer.MapSaved;
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
    public string? ProfilePath { get; init; }
    public int[]? ProfileWidths { get; init; }
    public string? BudgetColumnName { get; init; }
    public bool FastestWhenOverBudget { get; init; }
}

/// <summary>What a saved pipeline carries: the settings and the content hash of the model they were used with.</summary>
internal sealed record SavedSettings(TransformerSettings Settings, string ModelSha256);

/// <summary>The engine side of the transform: scores and completes one text at the current width; safe on many threads.</summary>
internal sealed class AnyPrecisionScorer : IDisposable
{
    private readonly IAnyPrecisionEngine _engine;
    private readonly Tokenizer _tokenizer;
    private readonly GenerationOptions _generation;
    private volatile int _bits;
    private volatile PrecisionProfile? _profile;
    private readonly Lazy<PrecisionCosts> _costs;

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
            _profile = settings.ProfilePath is { } path ? PrecisionProfile.Load(Model, path)
                : settings.ProfileWidths is { } widths ? new PrecisionProfile(Model, widths) : null;
            _engine = settings.Engine == AnyPrecisionEngineKind.Onnx ? new OnnxEngine(Model, new OnnxEngineOptions { Bits = _bits }) : new AnyPrecisionReferenceEngine(Model, _bits);
        }
        catch
        {
            Model.Dispose();
            throw;
        }
        // The profile's widths travel in the settings (a saved pipeline needs no file beside the model).
        Settings = settings with { ModelDirectory = Path.GetFullPath(settings.ModelDirectory), ProfilePath = null, ProfileWidths = _profile?.Widths.ToArray() };
        // Measured on this machine the first time a row has a budget (with the CLI's fingerprint, so `generate` shares the cache).
        _costs = new Lazy<PrecisionCosts>(() => PrecisionRouter.Load(_engine, Settings.ModelDirectory, $"{_engine.GetType().Name} int8", out _));
    }

    public TransformerSettings Settings { get; }
    public AnyPrecisionModel Model { get; }
    public string? DeviceFallback => (_engine as OnnxEngine)?.DeviceFallback;

    private string? _contentHash;
    /// <summary>The model directory's content SHA-256, read once when first asked (at the first save).</summary>
    public string ContentHash => _contentHash ??= AnyPrecisionModel.ContentHash(Settings.ModelDirectory);

    public int Bits
    {
        get => _bits;
        set
        {
            _bits = Model.CheckBits(value);
            _profile = null;
        }
    }

    public PrecisionProfile? Profile
    {
        get => _profile;
        set => _profile = value is null ? null : new PrecisionProfile(Model, value.Widths); // checked against this model
    }

    public void Map(AnyPrecisionInput input, AnyPrecisionOutput output)
    {
        string text = input.Text ?? "";
        int bits = _bits;
        var profile = _profile;
        int? draft = Settings.DraftBits < bits ? Settings.DraftBits : null;
        var generation = _generation;
        output.Route = "";
        if (input.Budget > 0)
        {
            var decision = PrecisionRouter.Choose(_costs.Value, input.Budget, Settings.FastestWhenOverBudget);
            (bits, draft, profile, output.Route) = (decision.Route.Bits, decision.Route.DraftBits, null, decision.Reason);
            if (draft is not null) generation = generation with { DraftTokens = decision.Route.DraftTokens };
        }
        if (profile is not null) draft = null; // drafting runs whole widths
        output.Bits = profile is null ? bits : (float)profile.AverageBits;
        output.DraftBits = draft ?? 0;
        IInferenceEngine engine = profile is null ? new FixedWidth(_engine, bits) : new ProfiledEngine(_engine, profile);
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
        output.Completion = generation.MaxTokens > 0 && tokens.Count < Model.Config.MaxSeqLen
            ? new TextGenerator(engine, _tokenizer).Generate(text, generation with { DraftBits = draft }).Text
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
        public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits, IReadOnlyList<int> widths) => engine.Forward(tokens, cache, logits, widths);
        public void Dispose() { }
    }
}
