using System.Text.Json.Nodes;
using AnyPrecML.Evaluation;
using AnyPrecML.Models;
using AnyPrecML.Quantization;
using AnyPrecML.Reference;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class AnyPrecisionModelTests
{
    private static TestData.TempDir _dir = null!;
    private static string Uniform => _dir["uniform"];
    private static string Hessian => _dir["hessian"];

    [ClassInitialize]
    public static void QuantizeOnce(TestContext _)
    {
        _dir = TestData.NewTempDir();
        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        AnyPrecisionQuantizer.Quantize(source, Uniform, new UniformSensitivity(), new QuantizerOptions());
        var tok = LlamaTokenizerLoader.Load(source);
        var calibration = CalibrationSet.FromText(tok, string.Join('\n', File.ReadLines(TestData.TinyStories).Take(6)), 100, 512, 512, "first 6 stories");
        var (sens, summary) = SensitivitySources.Create("hessian", ReferenceEngine.FromCheckpoint(source), calibration);
        AnyPrecisionQuantizer.Quantize(source, Hessian, sens, new QuantizerOptions(), summary);
    }

    [ClassCleanup]
    public static void Cleanup() => _dir.Dispose();

    [TestMethod]
    public void LoadedPlanesAndTablesEqualTheQuantizedLayers()
    {
        using var ap = AnyPrecisionModel.Open(Uniform);
        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        Assert.AreEqual(3, ap.SeedBits);
        Assert.AreEqual(8, ap.ParentBits);
        CollectionAssert.AreEqual(new[] { 3, 4, 5, 6, 7, 8 }, ap.SupportedBits.ToArray());
        Assert.AreEqual("uniform", ap.SensitivityKind);
        var fresh = AnyPrecisionQuantizer.QuantizeLayer(source, 2, "mlp.down_proj", new UniformSensitivity(), new QuantizerOptions());
        var loaded = ap.Linear(2, "mlp.down_proj");
        Assert.AreEqual((64, 172, 6), (loaded.Rows, loaded.Cols, loaded.WordsPerRow));
        for (int b = 3; b <= 8; b++) CollectionAssert.AreEqual(fresh.Dequantize(b), loaded.Dequantize(b), $"b={b}");
    }

    /// <summary>
    /// Format 3 as the quantizer writes it: a model whose planes reach 64 KiB (hidden 2048 over dim 256) gets padded
    /// planes, each tensor declaring the rows it holds; the padding rows are zero; reopened, every linear reads the
    /// weights a fresh quantization of it gives. Then the same model as format 2 wrote it (no padding rows), which
    /// <c>anyprec repack</c> turns into the very bytes the quantizer wrote, config.json included; repacking a model
    /// into its own directory is refused in one line.
    /// </summary>
    [TestMethod]
    public void PlanesOf64KiBAreWrittenPaddedAndRepackGivesAnOlderFileTheSameBytes()
    {
        using var dir = TestData.NewTempDir();
        var c = TestData.TinyConfig() with { Dim = 256, HiddenDim = 2048, Layers = 1, HeadDim = 64 };
        SyntheticModel.Write(c, dir["hf"], DType.F32);
        using var source = LlamaCheckpoint.Open(dir["hf"]);
        AnyPrecisionQuantizer.Quantize(source, dir["ap"], new UniformSensitivity(), new QuantizerOptions());
        using var ap = AnyPrecisionModel.Open(dir["ap"]);
        int padded = 0;
        foreach (var part in LlamaTensorNames.BlockLinears)
        {
            var m = ap.Linear(0, part);
            // gate, up: 2048 rows of 32 bytes; down: 256 rows of 256 bytes: 64 KiB planes, moved 2 KiB apart.
            int expected = part is "mlp.gate_proj" or "mlp.up_proj" ? 2048 + 64 : part == "mlp.down_proj" ? 256 + 8 : m.Rows;
            Assert.AreEqual(expected, m.PlaneRows, part);
            if (m.PlaneRows > m.Rows) padded++;
            var stored = ap.Checkpoint[AnyPrecisionModel.LinearName(0, part) + ".bitplanes"];
            CollectionAssert.AreEqual(new long[] { 8, m.PlaneRows, m.WordsPerRow }, stored.Shape.ToArray(), part);
            var words = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, uint>(stored.Bytes);
            for (int p = 0; p < 8; p++)
                Assert.IsTrue(words.Slice((int)((long)p * m.PlaneRows * m.WordsPerRow + (long)m.Rows * m.WordsPerRow), (m.PlaneRows - m.Rows) * m.WordsPerRow).IndexOfAnyExcept(0u) < 0, $"{part} plane {p}: padding rows are zero");
            var fresh = AnyPrecisionQuantizer.QuantizeLayer(source, 0, part, new UniformSensitivity(), new QuantizerOptions());
            foreach (int b in new[] { 3, 8 }) CollectionAssert.AreEqual(fresh.Dequantize(b), m.Dequantize(b), $"{part} b={b}");
        }
        Assert.AreEqual(3, padded, "gate, up and down are padded");

        // Format 2: every planes tensor without its padding rows, the version and layout as format 2 wrote them.
        Directory.CreateDirectory(dir["v2"]);
        var (file, tensors, meta) = SafetensorsReader.Open(Path.Combine(dir["ap"], "model.safetensors"));
        using (file)
        {
            var unpadded = tensors.Select(t =>
            {
                if (!t.Name.EndsWith(".bitplanes", StringComparison.Ordinal)) return new TensorToWrite(t.Name, t.DType, [.. t.Shape], s => s.Write(t.Bytes));
                int rows = ap.Linear(t.Name[..^".bitplanes".Length]).Rows;
                return new TensorToWrite(t.Name, t.DType, [t.Shape[0], rows, t.Shape[2]], s =>
                {
                    long plane = t.ByteLength / t.Shape[0], kept = rows * t.Shape[2] * 4;
                    for (int p = 0; p < t.Shape[0]; p++) s.Write(t.Bytes.Slice((int)(p * plane), (int)kept));
                });
            }).ToList();
            SafetensorsWriter.Write(Path.Combine(dir["v2"], "model.safetensors"), unpadded, meta);
        }
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir["ap"], "config.json")))!.AsObject();
        config["anyprecision"]!["format_version"] = 2;
        config["anyprecision"]!["bitplane_layout"] = "plane p = bit (n-1-p) of the parent code; U32 [n, rows, ceil(cols/32)], element j at word j/32, bit j%32";
        File.WriteAllText(Path.Combine(dir["v2"], "config.json"), config.ToJsonString(new() { WriteIndented = true }));
        foreach (var other in Directory.EnumerateFiles(dir["ap"]).Where(f => Path.GetFileName(f) is not ("model.safetensors" or "config.json")))
            File.Copy(other, Path.Combine(dir["v2"], Path.GetFileName(other)));
        using (var v2 = AnyPrecisionModel.Open(dir["v2"]))
        {
            Assert.AreEqual(2, v2.FormatVersion);
            Assert.AreEqual(v2.Linear(0, "mlp.down_proj").Rows, v2.Linear(0, "mlp.down_proj").PlaneRows);
            CollectionAssert.AreEqual(ap.Linear(0, "mlp.down_proj").Dequantize(5), v2.Linear(0, "mlp.down_proj").Dequantize(5));
        }
        var (code, output, err) = Cli.Run("info", "--model", dir["v2"]);
        Assert.AreEqual(0, code, err);
        StringAssert.Contains(output, $"format 2: `anyprec repack --model {dir["v2"]} --output DIR` rewrites it in format 3");
        (code, output, err) = Cli.Run("repack", "-m", dir["v2"], "-o", dir["repacked"]);
        Assert.AreEqual(0, code, err);
        StringAssert.Contains(output, "format 2 -> 3");
        CollectionAssert.AreEqual(File.ReadAllBytes(Path.Combine(dir["ap"], "model.safetensors")), File.ReadAllBytes(Path.Combine(dir["repacked"], "model.safetensors")));
        Assert.AreEqual(File.ReadAllText(Path.Combine(dir["ap"], "config.json")), File.ReadAllText(Path.Combine(dir["repacked"], "config.json")));
        CollectionAssert.AreEquivalent(Directory.EnumerateFiles(dir["ap"]).Select(Path.GetFileName).ToArray(), Directory.EnumerateFiles(dir["repacked"]).Select(Path.GetFileName).ToArray());
        (code, output, err) = Cli.Run("info", "--model", dir["repacked"]);
        Assert.AreEqual(0, code, err);
        Assert.DoesNotContain("anyprec repack", output);
        (code, _, err) = Cli.Run("repack", "-m", dir["v2"], "-o", dir["v2"]);
        Assert.AreEqual(2, code);
        var lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.HasCount(1, lines, err);
        StringAssert.StartsWith(lines[0], "error: the output directory must differ");
    }

    [TestMethod]
    public void QuantizationIsByteIdenticalForTheSameInputsAndSeedWhateverTheThreads()
    {
        using var dir = TestData.NewTempDir();
        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        AnyPrecisionQuantizer.Quantize(source, dir["one-thread"], new UniformSensitivity(), new QuantizerOptions { MaxDegreeOfParallelism = 1 });
        CollectionAssert.AreEqual(File.ReadAllBytes(Path.Combine(Uniform, "model.safetensors")), File.ReadAllBytes(dir["one-thread/model.safetensors"]));
        CollectionAssert.AreEqual(File.ReadAllBytes(Path.Combine(Uniform, "config.json")), File.ReadAllBytes(dir["one-thread/config.json"]));
        // The exact seed has no randomness: another random seed gives the same planes and tables.
        AnyPrecisionQuantizer.Quantize(source, dir["other-seed"], new UniformSensitivity(), new QuantizerOptions { RandomSeed = 99 });
        CollectionAssert.AreEqual(File.ReadAllBytes(Path.Combine(Uniform, "model.safetensors")), File.ReadAllBytes(dir["other-seed/model.safetensors"]));
        // The k-means++ baseline is seeded: the same seed reproduces it whatever the threads, another seed does not.
        AnyPrecisionQuantizer.Quantize(source, dir["kmeans-0"], new UniformSensitivity(), new QuantizerOptions { SeedMethod = SeedMethod.KMeans });
        AnyPrecisionQuantizer.Quantize(source, dir["kmeans-0-one-thread"], new UniformSensitivity(), new QuantizerOptions { SeedMethod = SeedMethod.KMeans, MaxDegreeOfParallelism = 1 });
        AnyPrecisionQuantizer.Quantize(source, dir["kmeans-99"], new UniformSensitivity(), new QuantizerOptions { SeedMethod = SeedMethod.KMeans, RandomSeed = 99 });
        CollectionAssert.AreEqual(File.ReadAllBytes(dir["kmeans-0/model.safetensors"]), File.ReadAllBytes(dir["kmeans-0-one-thread/model.safetensors"]));
        CollectionAssert.AreNotEqual(File.ReadAllBytes(dir["kmeans-0/model.safetensors"]), File.ReadAllBytes(dir["kmeans-99/model.safetensors"]));
        CollectionAssert.AreNotEqual(File.ReadAllBytes(Path.Combine(Uniform, "model.safetensors")), File.ReadAllBytes(dir["kmeans-0/model.safetensors"]));
    }

    [TestMethod]
    public void FileSizeIsWhatTheFormatSays()
    {
        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        var c = source.Config;
        long linears = 0;
        foreach (var part in LlamaTensorNames.BlockLinears)
        {
            var s = LlamaTensorNames.ShapeOf(c, part);
            linears += c.Layers * AnyPrecisionModel.LayerBytes(s[0], s[1], 3, 8);
        }
        long floats = ((long)c.VocabSize * c.Dim + c.Dim + 2L * c.Layers * c.Dim) * 4;
        string path = Path.Combine(Uniform, "model.safetensors");
        long header = 8 + (long)System.Buffers.Binary.BinaryPrimitives.ReadUInt64LittleEndian(File.ReadAllBytes(path).AsSpan(0, 8));
        Assert.AreEqual(new FileInfo(path).Length, header + linears + floats);
    }

    [TestMethod]
    public void HessianModelRecordsItsCalibrationAndKeepsQuality()
    {
        using var ap = AnyPrecisionModel.Open(Hessian);
        Assert.AreEqual("hessian", ap.SensitivityKind);
        Assert.AreEqual("first 6 stories", ap.Calibration!["source"]!.GetValue<string>());
        Assert.IsGreaterThan(1000, ap.Calibration!["tokens"]!.GetValue<long>());

        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        var tok = LlamaTokenizerLoader.Load(source);
        // Held-apart stories (the calibration used the first six), windows of 256 to keep the test short.
        var tokens = PerplexityEvaluator.Tokenize(tok, string.Join('\n', File.ReadLines(TestData.TinyStories).Skip(6).Take(4)), bosPerLine: true);
        var report = QualityEvaluator.Evaluate(ap, source, PerplexityEvaluator.Windows(tokens, 256), baselineSensitivity: null);
        var at = report.Rows.ToDictionary(r => r.Bits, r => r.AnyPrecision);
        Assert.AreEqual(report.Fp32, at[8], report.Fp32 * 0.005, "8-bit within 0.5% of fp32");
        for (int b = 4; b <= 8; b++) Assert.IsLessThanOrEqualTo(at[b - 1] * 1.002, at[b], $"perplexity at {b} bits should not exceed {b - 1} bits");
        Assert.IsGreaterThan(report.Fp32, at[3]);
    }

    [TestMethod]
    public void AnyPrecisionTracksIndependentAndBeatsRtnAtThreeBits()
    {
        using var ap = AnyPrecisionModel.Open(Uniform);
        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        var tok = LlamaTokenizerLoader.Load(source);
        var documents = PerplexityEvaluator.Documents(tok, string.Join('\n', File.ReadLines(TestData.TinyStories).Skip(6).Take(3)), truncate: 256);
        var report = QualityEvaluator.Evaluate(ap, source, documents, new UniformSensitivity());
        foreach (var row in report.Rows)
            Assert.IsLessThan(row.Independent!.Value * 1.03, row.AnyPrecision, $"b={row.Bits}: any-precision {row.AnyPrecision:F3} vs independent {row.Independent:F3}");
        Assert.IsGreaterThan(report.Rows[0].AnyPrecision * 1.1, report.Rows[0].Rtn!.Value, "RTN should be clearly worse at 3 bits");
    }

    [TestMethod]
    public void BitsOutsideSeedToParentAreRejected()
    {
        using var ap = AnyPrecisionModel.Open(Uniform);
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => ap.ToWeights(2));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => ap.ToWeights(9));
        Assert.ThrowsExactly<ArgumentOutOfRangeException>(() => ap.Linear(0, "self_attn.q_proj").Dequantize(2));
        var e = Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(Uniform));
        StringAssert.Contains(e.Message, "AnyPrecisionModel.Open");
    }

    [TestMethod]
    public void ConfigRecordsShapesAndTheQkPermutationAndVersionOneStillOpens()
    {
        var section = JsonNode.Parse(File.ReadAllText(Path.Combine(Uniform, "config.json")))!["anyprecision"]!;
        Assert.AreEqual(3, section["format_version"]!.GetValue<int>());
        Assert.AreEqual("exact", section["seed_method"]!.GetValue<string>());
        // stories260K: dim 64, hidden 172, 8 heads, 4 kv heads of 8: the padded planes hide cols = 172 of down_proj.
        CollectionAssert.AreEqual(new long[] { 64, 172 }, section["shapes"]!["mlp.down_proj"]!.AsArray().Select(n => n!.GetValue<long>()).ToArray());
        CollectionAssert.AreEqual(new long[] { 32, 64 }, section["shapes"]!["self_attn.k_proj"]!.AsArray().Select(n => n!.GetValue<long>()).ToArray());
        // llama2.c source: the q/k rows were permuted, and the recorded formula is the one applied.
        string perm = section["qk_permutation"]!.GetValue<string>();
        StringAssert.StartsWith(perm, "interleaved_to_half_split");
        using (var source = LlamaCheckpoint.Open(TestData.Stories260K))
        {
            int D = source.Config.HeadDim, cols = source.Config.Dim;
            var src = source[LlamaTensorNames.Layer(0, "self_attn.k_proj")].ToFloatArray();
            var hf = AnyPrecisionQuantizer.SourceWeight(source, 0, "self_attn.k_proj");
            for (int h = 0; h < source.Config.KvHeads; h++)
                for (int i = 0; i < D / 2; i++)
                {
                    CollectionAssert.AreEqual(src.AsSpan((h * D + 2 * i) * cols, cols).ToArray(), hf.AsSpan((h * D + i) * cols, cols).ToArray());
                    CollectionAssert.AreEqual(src.AsSpan((h * D + 2 * i + 1) * cols, cols).ToArray(), hf.AsSpan((h * D + D / 2 + i) * cols, cols).ToArray());
                }
        }

        using var dir = TestData.NewTempDir();
        string any = "model.layers.0.self_attn.q_proj.centroids.3";
        Tamper(Uniform, dir["v1"], any, t => new TensorToWrite(t.Name, t.DType, [.. t.Shape], s => s.Write(t.Bytes)), cfg =>
        {
            var ap = cfg["anyprecision"]!.AsObject();
            ap["format_version"] = 1;
            ap.Remove("shapes"); ap.Remove("qk_permutation"); ap.Remove("seed_method");
        });
        using (var v1 = AnyPrecisionModel.Open(dir["v1"]))
        using (var v2 = AnyPrecisionModel.Open(Uniform))
            CollectionAssert.AreEqual(v2.Linear(0, "mlp.down_proj").Dequantize(4), v1.Linear(0, "mlp.down_proj").Dequantize(4));
        Tamper(Uniform, dir["bad-shape"], any, t => new TensorToWrite(t.Name, t.DType, [.. t.Shape], s => s.Write(t.Bytes)),
            cfg => cfg["anyprecision"]!["shapes"]!["mlp.down_proj"] = new JsonArray(64, 160));
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => AnyPrecisionModel.Open(dir["bad-shape"])).Message, "anyprecision.shapes.mlp.down_proj");
        Tamper(Uniform, dir["v4"], any, t => new TensorToWrite(t.Name, t.DType, [.. t.Shape], s => s.Write(t.Bytes)), cfg => cfg["anyprecision"]!["format_version"] = 4);
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => AnyPrecisionModel.Open(dir["v4"])).Message, "version 4");

        // Planes padded with zero rows (what format 3 writes for planes of 64 KB and more; stories260K's are smaller):
        // the stride is what the tensor's shape says, and every width reads as before. Fewer rows than the linear's is an error.
        string planes = "model.layers.1.mlp.down_proj.bitplanes";
        Tamper(Uniform, dir["padded"], planes, t => new TensorToWrite(t.Name, t.DType, [t.Shape[0], t.Shape[1] + 5, t.Shape[2]], s =>
        {
            long plane = t.ByteLength / t.Shape[0];
            for (int p = 0; p < t.Shape[0]; p++)
            {
                s.Write(t.Bytes.Slice((int)(p * plane), (int)plane));
                s.Write(new byte[5 * t.Shape[2] * 4]);
            }
        }));
        using (var padded = AnyPrecisionModel.Open(dir["padded"]))
        using (var original = AnyPrecisionModel.Open(Uniform))
        {
            Assert.AreEqual(original.Linear(1, "mlp.down_proj").Rows + 5, padded.Linear(1, "mlp.down_proj").PlaneRows);
            for (int b = 3; b <= 8; b++)
                CollectionAssert.AreEqual(original.Linear(1, "mlp.down_proj").Dequantize(b), padded.Linear(1, "mlp.down_proj").Dequantize(b), $"b={b}");
            Assert.AreEqual(original.LinearBytes(4), padded.LinearBytes(4), "padding rows are not read");
        }
        Tamper(Uniform, dir["over-padded"], planes, t => new TensorToWrite(t.Name, t.DType, [t.Shape[0], t.Shape[1] + 257, t.Shape[2]],
            s => s.Write(new byte[t.Shape[0] * (t.Shape[1] + 257) * t.Shape[2] * 4])));
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => AnyPrecisionModel.Open(dir["over-padded"])).Message, $"{planes}' has shape [8, 321, 6]");
    }

    /// <summary>Rewrites the quantized model with one tensor changed, through the reader and writer.</summary>
    private static void Tamper(string from, string to, string tensor, Func<TensorView, TensorToWrite> replace, Action<JsonObject>? editConfig = null)
    {
        Directory.CreateDirectory(to);
        var (file, tensors, meta) = SafetensorsReader.Open(Path.Combine(from, "model.safetensors"));
        using (file)
        {
            var list = tensors.Select(t => t.Name == tensor ? replace(t) : new TensorToWrite(t.Name, t.DType, [.. t.Shape], s => s.Write(t.Bytes))).ToList();
            SafetensorsWriter.Write(Path.Combine(to, "model.safetensors"), list, meta);
        }
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(from, "config.json")))!.AsObject();
        editConfig?.Invoke(cfg);
        File.WriteAllText(Path.Combine(to, "config.json"), cfg.ToJsonString());
    }

    [TestMethod]
    public void CorruptOrInconsistentFilesAreRejectedClearly()
    {
        using var dir = TestData.NewTempDir();
        string planes = "model.layers.1.mlp.up_proj.bitplanes", table = "model.layers.0.self_attn.k_proj.centroids.5";
        Tamper(Uniform, dir["short-planes"], planes, t => new TensorToWrite(t.Name, DType.U32, [8, 100, 2], s => s.Write(new byte[8 * 100 * 2 * 4])));
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => AnyPrecisionModel.Open(dir["short-planes"])).Message, planes);
        Tamper(Uniform, dir["wrong-table"], table, t => new TensorToWrite(t.Name, DType.F16, [32, 16], s => s.Write(new byte[32 * 16 * 2])));
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => AnyPrecisionModel.Open(dir["wrong-table"])).Message, "expected [32, 32]");
        Tamper(Uniform, dir["f32-table"], table, t => new TensorToWrite(t.Name, DType.F32, [32, 16], s => s.Write(new byte[32 * 32 * 2])));
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => AnyPrecisionModel.Open(dir["f32-table"])).Message, "F16");
        Tamper(Uniform, dir["bad-bits"], "", t => null!, c => c["anyprecision"]!["parent_bits"] = 9);
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => AnyPrecisionModel.Open(dir["bad-bits"])).Message, "parent_bits 9");
        Tamper(Uniform, dir["seed-above"], "", t => null!, c => c["anyprecision"]!["seed_bits"] = 2);
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => AnyPrecisionModel.Open(dir["seed-above"])).Message, "centroids.2");
        var bytes = File.ReadAllBytes(Path.Combine(Uniform, "model.safetensors"));
        Directory.CreateDirectory(dir["truncated"]);
        File.Copy(Path.Combine(Uniform, "config.json"), dir["truncated/config.json"]);
        File.WriteAllBytes(dir["truncated/model.safetensors"], bytes[..(bytes.Length / 2)]);
        Assert.ThrowsExactly<ModelFormatException>(() => AnyPrecisionModel.Open(dir["truncated"]));
    }

    [TestMethod]
    public void InfoJsonReportsWidthsCalibrationAndBytesThatTheFileAndShapeConfirm()
    {
        var (code, output, err) = Cli.Run("info", "--model", Hessian, "--json");
        Assert.AreEqual(0, code, err);
        var info = System.Text.Json.JsonDocument.Parse(output).RootElement;
        Assert.AreEqual("AnyPrecision", info.GetProperty("format").GetString());
        Assert.AreEqual((3, 8), (info.GetProperty("seed_bits").GetInt32(), info.GetProperty("parent_bits").GetInt32()));
        CollectionAssert.AreEqual(new[] { 3, 4, 5, 6, 7, 8 }, info.GetProperty("widths").EnumerateArray().Select(e => e.GetInt32()).ToArray());
        Assert.AreEqual("hessian", info.GetProperty("sensitivity").GetString());
        var calibration = info.GetProperty("calibration");
        Assert.AreEqual("first 6 stories", calibration.GetProperty("source").GetString());
        Assert.AreEqual(6, calibration.GetProperty("samples").GetInt32());

        // Independently: every width's bytes from the shapes (planes are [n, rows, ceil(cols/32)] U32, tables [rows, 2^b] F16)...
        var c = LlamaCheckpoint.Open(TestData.Stories260K).Config;
        long[] shape(string part) => LlamaTensorNames.ShapeOf(c, part);
        long unquantized = ((long)c.VocabSize * c.Dim + (2L * c.Layers + 1) * c.Dim) * 4;   // fp32 embedding (tied head) and norms
        var bytes = info.GetProperty("bytes");
        long separate = 0;
        foreach (var w in bytes.GetProperty("per_width").EnumerateArray())
        {
            int b = w.GetProperty("bits").GetInt32();
            long planes = c.Layers * LlamaTensorNames.BlockLinears.Sum(p => b * shape(p)[0] * ((shape(p)[1] + 31) / 32) * 4);
            long table = c.Layers * LlamaTensorNames.BlockLinears.Sum(p => shape(p)[0] * (1L << b) * 2);
            Assert.AreEqual(planes, w.GetProperty("planes").GetInt64(), $"b={b}");
            Assert.AreEqual(table, w.GetProperty("table").GetInt64(), $"b={b}");
            Assert.AreEqual(planes + table + unquantized, w.GetProperty("model").GetInt64(), $"b={b}");
            separate += planes + table + unquantized;
        }
        Assert.AreEqual(unquantized, bytes.GetProperty("unquantized").GetInt64());
        Assert.AreEqual(separate, bytes.GetProperty("separate_models").GetInt64());
        // ...and the parent is every tensor of the file: its size less the safetensors header (8-byte length + JSON).
        string file = Path.Combine(Hessian, "model.safetensors");
        using var fs = File.OpenRead(file);
        var length = new byte[8];
        fs.ReadExactly(length);
        long parent = new FileInfo(file).Length - 8 - BitConverter.ToInt64(length);
        Assert.AreEqual(parent, bytes.GetProperty("parent").GetInt64());
        Assert.IsLessThan(separate, parent);
    }

    [TestMethod]
    public void InfoTextShowsTheTableAndTheParentBesideSeparateModels()
    {
        var (code, output, err) = Cli.Run("info", "--model", Uniform);
        Assert.AreEqual(0, code, err);
        using var ap = AnyPrecisionModel.Open(Uniform);
        var (planes, table) = ap.LinearBytes(5);
        StringAssert.Contains(output, "widths 3..8: one 8-bit parent, seed 3 bits (exact)");
        StringAssert.Contains(output, "sensitivity uniform; calibration: none");
        StringAssert.Contains(output, $"| 5 | {planes:N0} | {table:N0} | {planes + table + ap.UnquantizedBytes:N0} |");
        StringAssert.Contains(output, $"one 8-bit parent serving 3..8: {ap.StoredBytes:N0} bytes");
    }
}
