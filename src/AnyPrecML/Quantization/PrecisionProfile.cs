using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using AnyPrecML.Models;

namespace AnyPrecML.Quantization;

/// <summary>
/// One width per quantized linear of an any-precision model, all read from the same parent: a model of any average
/// width between seed and parent (3.25, 3.5, 4.5 bits …) without requantizing. Widths are in
/// <see cref="AnyPrecisionModel.LinearIndex"/> order (layer-major, parts in <see cref="LlamaTensorNames.BlockLinears"/>
/// order). The average is per weight: each linear counts by its rows × cols, so it is the bits a weight costs to read.
/// </summary>
public sealed class PrecisionProfile
{
    /// <summary>The "format" field of a profile file.</summary>
    public const string FormatName = "anyprecml.precision_profile";

    private readonly int[] _widths;

    /// <summary>A profile of <paramref name="widths"/> (one per linear of <paramref name="model"/>, each in seed..parent).</summary>
    /// <exception cref="ArgumentException">The count or a width does not fit the model.</exception>
    public PrecisionProfile(AnyPrecisionModel model, IReadOnlyList<int> widths)
    {
        ArgumentNullException.ThrowIfNull(model);
        ArgumentNullException.ThrowIfNull(widths);
        if (widths.Count != model.LinearCount)
            throw new ArgumentException($"a profile of this model holds {model.LinearCount} widths (one per linear), not {widths.Count}.", nameof(widths));
        for (int i = 0; i < widths.Count; i++)
            if (widths[i] < model.SeedBits || widths[i] > model.ParentBits)
                throw new ArgumentException($"{model.LinearName(i)}: width {widths[i]} is outside this model's {model.SeedBits}..{model.ParentBits} bits.", nameof(widths));
        _widths = [.. widths];
        long weights = 0, bits = 0;
        for (int i = 0; i < _widths.Length; i++)
        {
            var w = model.Linear(i);
            weights += (long)w.Rows * w.Cols;
            bits += (long)w.Rows * w.Cols * _widths[i];
        }
        AverageBits = (double)bits / weights;
    }

    /// <summary>Every linear at <paramref name="bits"/>.</summary>
    public static PrecisionProfile Uniform(AnyPrecisionModel model, int bits) =>
        new(model, Enumerable.Repeat(model.CheckBits(bits), model.LinearCount).ToArray());

    /// <summary>The widths, one per linear in <see cref="AnyPrecisionModel.LinearIndex"/> order.</summary>
    public IReadOnlyList<int> Widths => _widths;

    /// <summary>Bits per weight over all quantized linears (each linear weighted by its size).</summary>
    public double AverageBits { get; }

    /// <summary>The average the profile was chosen for (null when not recorded).</summary>
    public double? TargetBits { get; init; }

    /// <summary>How the profile was chosen and on what (written to the file as is).</summary>
    public JsonObject? Provenance { get; init; }

    /// <summary>"3.5 bits (3.497 average)"-style description for logs.</summary>
    public override string ToString() =>
        string.Create(CultureInfo.InvariantCulture, $"profile {(TargetBits is double t ? $"{t:0.###} bits, " : "")}{AverageBits:0.###} bits per weight, widths {_widths.Min()}..{_widths.Max()}");

    /// <summary>The file name of the profile for <paramref name="targetBits"/> beside a model: <c>profile-3.5bit.json</c>.</summary>
    public static string FileName(double targetBits) => string.Create(CultureInfo.InvariantCulture, $"profile-{targetBits:0.###}bit.json");

    /// <summary>Writes the profile as JSON (widths by linear name) to a temporary name, then renames it over <paramref name="path"/>.</summary>
    public void Save(AnyPrecisionModel model, string path)
    {
        var widths = new JsonObject();
        for (int i = 0; i < _widths.Length; i++) widths[model.LinearName(i)] = _widths[i];
        var json = new JsonObject
        {
            ["format"] = FormatName,
            ["version"] = 1,
            ["target_bits"] = TargetBits,
            ["average_bits"] = Math.Round(AverageBits, 6),
            ["seed_bits"] = model.SeedBits,
            ["parent_bits"] = model.ParentBits,
            ["provenance"] = Provenance?.DeepClone(),
            ["widths"] = widths,
        };
        string full = Path.GetFullPath(path), temp = full + ".tmp";
        File.WriteAllText(temp, json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        File.Move(temp, full, overwrite: true);
    }

    /// <summary>Reads a profile written by <see cref="Save"/> for <paramref name="model"/>.</summary>
    /// <exception cref="ModelFormatException">The file is not a profile, or not one of this model (naming what is wrong).</exception>
    public static PrecisionProfile Load(AnyPrecisionModel model, string path)
    {
        ArgumentNullException.ThrowIfNull(model);
        if (!File.Exists(path)) throw new FileNotFoundException($"{path}: no precision profile there.", path);
        JsonObject json;
        try { json = JsonNode.Parse(File.ReadAllText(path)) as JsonObject ?? throw new ModelFormatException($"{path}: a precision profile is a JSON object."); }
        catch (JsonException e) { throw new ModelFormatException($"{path}: not valid JSON: {e.Message}", e); }
        if (json["format"]?.GetValueKind() != JsonValueKind.String || (string?)json["format"] != FormatName)
            throw new ModelFormatException($"{path}: not a precision profile (its \"format\" is not \"{FormatName}\").");
        if (json["widths"] is not JsonObject named) throw new ModelFormatException($"{path}: \"widths\" (linear name → bits) is missing.");
        var widths = new int[model.LinearCount];
        for (int i = 0; i < widths.Length; i++)
        {
            string name = model.LinearName(i);
            widths[i] = named[name] is JsonValue v && v.TryGetValue<int>(out int b) ? b
                : throw new ModelFormatException($"{path}: no integer width for {name}; the profile was made for another model.");
        }
        if (named.Count != widths.Length) throw new ModelFormatException($"{path}: {named.Count} widths for a model of {widths.Length} linears; the profile was made for another model.");
        try
        {
            return new PrecisionProfile(model, widths)
            {
                TargetBits = json["target_bits"] is JsonValue t && t.TryGetValue<double>(out double target) ? target : null,
                Provenance = json["provenance"]?.DeepClone() as JsonObject,
            };
        }
        catch (ArgumentException e) { throw new ModelFormatException($"{path}: {e.Message}", e); }
    }
}

/// <summary>
/// An any-precision engine run at one <see cref="PrecisionProfile"/>: <see cref="Forward"/> gives each linear its own
/// width, over the engine's one copy of the weights. Per request, as concurrent requests may run other widths.
/// </summary>
/// <param name="engine">The engine (an <c>OnnxEngine</c> or <see cref="AnyPrecisionReferenceEngine"/>).</param>
/// <param name="profile">The widths.</param>
/// <param name="ownsEngine">Whether <see cref="Dispose"/> disposes <paramref name="engine"/>.</param>
public sealed class ProfiledEngine(IAnyPrecisionEngine engine, PrecisionProfile profile, bool ownsEngine = false) : IInferenceEngine
{
    /// <summary>The engine run.</summary>
    public IAnyPrecisionEngine Engine { get; } = engine ?? throw new ArgumentNullException(nameof(engine));

    /// <summary>The widths it runs at.</summary>
    public PrecisionProfile Profile { get; } = profile ?? throw new ArgumentNullException(nameof(profile));

    /// <inheritdoc/>
    public LlamaConfig Config => Engine.Config;

    /// <inheritdoc/>
    public KvCache CreateCache(int capacity = 0) => Engine.CreateCache(capacity);

    /// <inheritdoc/>
    public void Forward(ReadOnlySpan<int> tokens, KvCache cache, Span<float> logits) => Engine.Forward(tokens, cache, logits, Profile.Widths);

    /// <summary>Disposes the engine when it was handed over (<c>ownsEngine</c>).</summary>
    public void Dispose()
    {
        if (ownsEngine) Engine.Dispose();
    }
}
