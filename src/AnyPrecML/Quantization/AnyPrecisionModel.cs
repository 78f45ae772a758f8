using System.Text.Json;
using System.Text.Json.Nodes;
using AnyPrecML.Models;
using AnyPrecML.Reference;

namespace AnyPrecML.Quantization;

/// <summary>
/// An any-precision model on disk (docs/FORMAT.md), opened once: its planes and tables stay in the
/// memory-mapped safetensors file and are shared by every bit-width served. Nothing is decoded at
/// open; <see cref="ToWeights(int)"/> dequantizes one width when asked.
/// </summary>
public sealed class AnyPrecisionModel : IDisposable
{
    private readonly BitplaneMatrix[,] _linears;

    private AnyPrecisionModel(LlamaCheckpoint checkpoint, int formatVersion, int seedBits, int parentBits, string sensitivity, JsonObject? calibration, BitplaneMatrix[,] linears)
    {
        Checkpoint = checkpoint; FormatVersion = formatVersion; SeedBits = seedBits; ParentBits = parentBits; SensitivityKind = sensitivity; Calibration = calibration; _linears = linears;
    }

    /// <summary>The unquantized tensors (embedding, norms, head), the configuration and the tokenizer path.</summary>
    public LlamaCheckpoint Checkpoint { get; }
    /// <summary>The model's configuration.</summary>
    public LlamaConfig Config => Checkpoint.Config;
    /// <summary>The format version the directory was written in (docs/FORMAT.md; <c>anyprec repack</c> brings an older one up to date).</summary>
    public int FormatVersion { get; }
    /// <summary>Narrowest width served.</summary>
    public int SeedBits { get; }
    /// <summary>Parent width n.</summary>
    public int ParentBits { get; }
    /// <summary>Every width served: seed..n.</summary>
    public IReadOnlyList<int> SupportedBits => Enumerable.Range(SeedBits, ParentBits - SeedBits + 1).ToArray();
    /// <summary>The sensitivity the model was quantized with ("uniform", "hessian", "fisher").</summary>
    public string SensitivityKind { get; }
    /// <summary>What the calibration was (source, samples, tokens, sha256), as recorded; null for uniform.</summary>
    public JsonObject? Calibration { get; }

    /// <summary>The linear <paramref name="part"/> of block <paramref name="layer"/>.</summary>
    public BitplaneMatrix Linear(int layer, string part)
    {
        int i = Array.IndexOf(LlamaTensorNames.BlockLinears, part);
        if (i < 0) throw new ArgumentException($"unknown linear layer '{part}'.", nameof(part));
        return _linears[layer, i];
    }

    /// <summary>Quantized linears in the model: layers × <see cref="LlamaTensorNames.BlockLinears"/>.</summary>
    public int LinearCount => _linears.Length;

    /// <summary>The linear at <paramref name="index"/> of <see cref="LinearIndex"/>'s order (layer-major, parts in <see cref="LlamaTensorNames.BlockLinears"/> order).</summary>
    public BitplaneMatrix Linear(int index) => _linears[index / _linears.GetLength(1), index % _linears.GetLength(1)];

    /// <summary>The name (model.layers.{l}.{part}) of the linear at <paramref name="index"/>.</summary>
    public string LinearName(int index) => LinearName(index / _linears.GetLength(1), LlamaTensorNames.BlockLinears[index % _linears.GetLength(1)]);

    /// <summary>The quantized linear called <paramref name="name"/> (model.layers.{l}.{part}, as <see cref="LinearName(int, string)"/> writes it).</summary>
    /// <exception cref="KeyNotFoundException">No quantized linear has that name.</exception>
    public BitplaneMatrix Linear(string name) => Linear(LinearIndex(name));

    /// <summary>
    /// The position of the linear called <paramref name="name"/> in the order every per-linear list uses (a
    /// <see cref="PrecisionProfile"/>'s widths, the engine's <c>bits</c> input): layer-major, parts in <see cref="LlamaTensorNames.BlockLinears"/> order.
    /// </summary>
    /// <exception cref="KeyNotFoundException">No quantized linear has that name.</exception>
    public int LinearIndex(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        const string Prefix = "model.layers.";
        if (name.StartsWith(Prefix, StringComparison.Ordinal))
        {
            int dot = name.IndexOf('.', Prefix.Length);
            if (dot > 0 && int.TryParse(name.AsSpan(Prefix.Length, dot - Prefix.Length), System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int layer)
                && layer < Config.Layers && Array.IndexOf(LlamaTensorNames.BlockLinears, name[(dot + 1)..]) is int i and >= 0)
                return layer * _linears.GetLength(1) + i;
        }
        throw new KeyNotFoundException($"no quantized linear called '{name}' (names look like {LinearName(0, LlamaTensorNames.BlockLinears[0])}).");
    }

    /// <summary>Throws <see cref="ArgumentOutOfRangeException"/> unless <paramref name="bits"/> is in seed..n.</summary>
    public int CheckBits(int bits) => bits >= SeedBits && bits <= ParentBits ? bits
        : throw new ArgumentOutOfRangeException(nameof(bits), bits, $"this model serves {SeedBits}..{ParentBits} bits.");

    /// <summary>fp32 weights of the b-bit model (every linear dequantized through its b-bit table) for the reference engine.</summary>
    public LlamaWeights ToWeights(int bits)
    {
        CheckBits(bits);
        return LlamaWeights.FromCheckpoint(Checkpoint, (l, part) => Linear(l, part).Dequantize(bits));
    }

    /// <summary>fp32 weights of <paramref name="profile"/>'s model (each linear dequantized through the table of its own width).</summary>
    public LlamaWeights ToWeights(PrecisionProfile profile)
    {
        ArgumentNullException.ThrowIfNull(profile);
        int parts = _linears.GetLength(1);
        return LlamaWeights.FromCheckpoint(Checkpoint, (l, part) => Linear(l, part).Dequantize(profile.Widths[l * parts + Array.IndexOf(LlamaTensorNames.BlockLinears, part)]));
    }

    /// <summary>&lt;prefix&gt; of a quantized linear's tensors: model.layers.{l}.{part}.</summary>
    public static string LinearName(int layer, string part) => $"model.layers.{layer}.{part}";

    /// <summary>Opens an any-precision directory; throws <see cref="ModelFormatException"/> naming what is wrong.</summary>
    public static AnyPrecisionModel Open(string directory)
    {
        if (!Directory.Exists(directory)) throw new DirectoryNotFoundException($"No any-precision model directory at '{directory}'.");
        string cfgPath = Path.Combine(directory, "config.json");
        JsonObject section;
        try
        {
            section = (ModelJson.Parse(cfgPath) as JsonObject)?["anyprecision"] as JsonObject
                ?? throw new ModelFormatException($"{cfgPath}: no 'anyprecision' section; this is not an any-precision model (quantize it with `anyprec quantize`).");
        }
        catch (FileNotFoundException e) { throw new ModelFormatException($"{cfgPath}: config.json is missing.", e); }

        int Int(string key)
        {
            var n = section[key] ?? throw new ModelFormatException($"{cfgPath}: anyprecision.{key} is missing.");
            return n is JsonValue v && v.TryGetValue<int>(out int i) ? i : throw new ModelFormatException($"{cfgPath}: anyprecision.{key} is not an integer.");
        }
        int version = Int("format_version");
        if (version is < 1 or > AnyPrecisionQuantizer.FormatVersion) throw new ModelFormatException($"{cfgPath}: any-precision format version {version} is not supported (this build reads 1..{AnyPrecisionQuantizer.FormatVersion}).");
        int seed = Int("seed_bits"), parent = Int("parent_bits");
        if (seed < 1 || seed > parent || parent > 8) throw new ModelFormatException($"{cfgPath}: seed_bits {seed} and parent_bits {parent} must satisfy 1 ≤ seed ≤ parent ≤ 8.");
        string sensitivity = section["sensitivity"] is JsonValue sv && sv.TryGetValue<string>(out var kind) ? kind : "unknown";

        // Read with TryGetValue: a dimension of another JSON kind is a mismatch, not a .NET conversion exception.
        static long? Dim(JsonNode? n) => n is JsonValue v && v.TryGetValue<long>(out long d) ? d : null;
        if (section["shapes"] is not (null or JsonObject)) throw new ModelFormatException($"{cfgPath}: anyprecision.shapes must be an object of [rows, cols] per part.");

        var cp = LlamaCheckpoint.OpenHuggingFace(directory, blockLinears: false);
        try
        {
            var c = cp.Config;
            var linears = new BitplaneMatrix[c.Layers, LlamaTensorNames.BlockLinears.Length];
            for (int l = 0; l < c.Layers; l++)
                for (int i = 0; i < LlamaTensorNames.BlockLinears.Length; i++)
                {
                    string part = LlamaTensorNames.BlockLinears[i], name = LinearName(l, part);
                    var shape = LlamaTensorNames.ShapeOf(c, part);
                    // Version 2 records [rows, cols] per part (cols is not recoverable from the padded planes); it must agree with the config.
                    if (section["shapes"] is JsonObject shapes && shapes[part] is JsonArray recorded && (recorded.Count != 2 || Dim(recorded[0]) != shape[0] || Dim(recorded[1]) != shape[1]))
                        throw new ModelFormatException($"{cfgPath}: anyprecision.shapes.{part} is {recorded.ToJsonString()} but the Llama config gives [{shape[0]},{shape[1]}].");
                    var tables = Enumerable.Range(seed, parent - seed + 1).Select(b => cp[$"{name}.centroids.{b}"]).ToArray();
                    linears[l, i] = BitplaneMatrix.FromTensors(name, (int)shape[0], (int)shape[1], seed, parent, cp[name + ".bitplanes"], tables);
                }
            return new AnyPrecisionModel(cp, version, seed, parent, sensitivity, section["calibration"] as JsonObject, linears);
        }
        catch
        {
            cp.Dispose();
            throw;
        }
    }

    /// <summary>
    /// SHA-256 (hex) of what decides the model's outputs: config.json, model.safetensors and tokenizer.model, in that
    /// order, each prefixed by its name and length. Reads every byte once (about a second per GB); files written beside
    /// the model by others (a saved ML.NET pipeline's settings) do not change it.
    /// </summary>
    public static string ContentHash(string directory)
    {
        using var hash = System.Security.Cryptography.IncrementalHash.CreateHash(System.Security.Cryptography.HashAlgorithmName.SHA256);
        var buffer = new byte[1 << 20];
        foreach (var name in new[] { "config.json", "model.safetensors", "tokenizer.model" })
        {
            string path = Path.Combine(directory, name);
            if (!File.Exists(path)) continue;
            using var fs = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1);
            hash.AppendData(System.Text.Encoding.UTF8.GetBytes($"{name}\n{fs.Length}\n"));
            int n;
            while ((n = fs.Read(buffer)) > 0) hash.AppendData(buffer, 0, n);
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }

    /// <summary>
    /// Bytes a <paramref name="bits"/>-bit model reads of the quantized linears: planes 0..b-1 of each (their rows, not
    /// the padding rows of format 3) and the b-bit centroid table of every linear, as stored.
    /// </summary>
    public (long Planes, long Table) LinearBytes(int bits)
    {
        CheckBits(bits);
        long planes = 0, table = 0;
        foreach (var name in QuantizedNames())
        {
            // A plane's own rows, not its padding rows (format 3), which no product reads.
            var m = Linear(name);
            planes += (long)bits * m.Rows * m.WordsPerRow * 4;
            table += Checkpoint[$"{name}.centroids.{bits}"].ByteLength;
        }
        return (planes, table);
    }

    /// <summary>Bytes of every tensor in the file: the parent's memory (all planes, every table, the unquantized tensors).</summary>
    public long StoredBytes => Checkpoint.TensorNames.Sum(n => Checkpoint[n].ByteLength);

    /// <summary>Bytes of the tensors kept unquantized (embedding, norms, untied head), which every width reads whole.</summary>
    public long UnquantizedBytes => StoredBytes - QuantizedNames().Sum(name => Checkpoint[name + ".bitplanes"].ByteLength
        + SupportedBits.Sum(b => Checkpoint[$"{name}.centroids.{b}"].ByteLength));

    private IEnumerable<string> QuantizedNames() =>
        Enumerable.Range(0, Config.Layers).SelectMany(l => LlamaTensorNames.BlockLinears.Select(part => LinearName(l, part)));

    /// <summary>Bytes of one linear layer's tensors in this format with planes for <paramref name="parentBits"/> (padding rows included) and tables for seed..parent.</summary>
    public static long LayerBytes(long rows, long cols, int seedBits, int parentBits)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThan(rows, int.MaxValue);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(cols, int.MaxValue);
        long planes = (long)parentBits * BitplaneMatrix.PaddedPlaneRows((int)rows, (int)cols) * ((cols + 31) / 32) * 4;
        long tables = 0;
        for (int b = seedBits; b <= parentBits; b++) tables += rows * (1L << b) * 2;
        return planes + tables;
    }

    /// <summary>Unmaps the file.</summary>
    public void Dispose() => Checkpoint.Dispose();
}
