using System.Buffers.Binary;
using System.Text.Json;
using System.Text.Json.Nodes;
using AnyPrecML.Cli;
using AnyPrecML.Models;
using AnyPrecML.Quantization;

namespace AnyPrecML.Tests;

/// <summary>Inputs that once crashed the process, non-finite values, and the one error style.</summary>
[TestClass]
public sealed class ReliabilityTests
{
    private static void AssertOneErrorLine(string err, string contains)
    {
        var lines = err.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.HasCount(1, lines, err);
        StringAssert.StartsWith(lines[0], "error: ");
        StringAssert.Contains(lines[0], contains);
        Assert.DoesNotContain("Exception", lines[0]);
        Assert.DoesNotContain("System.", lines[0]);
    }

    [TestMethod]
    public void Llama2cHeaderWithVocabSizeMinusTwoToThe31IsABadInputNotACrash()
    {
        using var dir = TestData.NewTempDir();
        var bytes = File.ReadAllBytes(TestData.Stories260K);
        BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(20), int.MinValue); // version-0 header: vocab_size is the sixth int
        File.WriteAllBytes(dir["vocab.bin"], bytes);
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(dir["vocab.bin"])).Message, "vocab_size");
        var (code, _, err) = Cli.Run("info", "--model", dir["vocab.bin"]);
        Assert.AreEqual(AnyPrecCli.ExitBadInput, code);
        AssertOneErrorLine(err, $"({dir["vocab.bin"]})");
    }

    private static string HuggingFaceDir(TestData.TempDir dir, Action<JsonObject> edit)
    {
        string hf = dir["hf-" + Guid.NewGuid().ToString("N")[..6]];
        CheckpointTests.WriteHuggingFace(TestData.RandomWeights(TestData.TinyConfig(), seed: 3), hf);
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(hf, "config.json")))!.AsObject();
        edit(config);
        File.WriteAllText(Path.Combine(hf, "config.json"), config.ToJsonString());
        return hf;
    }

    [TestMethod]
    public void ConfigJsonTokenIdsOfAnyShapeAreReadOrNamed()
    {
        using var dir = TestData.NewTempDir();
        // The crash input: a list holding null means "not given", so the default applies.
        using (var cp = LlamaCheckpoint.Open(HuggingFaceDir(dir, c => c["bos_token_id"] = new JsonArray((JsonNode?)null))))
            Assert.AreEqual(1, cp.Config.BosTokenId);
        using (var cp = LlamaCheckpoint.Open(HuggingFaceDir(dir, c => c["eos_token_id"] = new JsonArray(7, 9))))
            Assert.AreEqual(7, cp.Config.EosTokenId, "the first id of a list is used");
        // Wrong kinds name the key instead of leaking a conversion exception.
        foreach (var (key, value, expected) in new (string, JsonNode, string)[]
        {
            ("bos_token_id", JsonValue.Create("one"), "'bos_token_id' is not a token id"),
            ("bos_token_id", new JsonArray(JsonValue.Create(1.5)), "'bos_token_id' is not a token id"),
            ("tie_word_embeddings", JsonValue.Create(3), "'tie_word_embeddings' is not true or false"),
            ("hidden_size", JsonValue.Create("32"), "'hidden_size' is not a 32-bit integer"),
            ("vocab_size", JsonValue.Create(1e12), "'vocab_size' is not a 32-bit integer"),
            ("rms_norm_eps", new JsonObject(), "'rms_norm_eps' is not a number"),
            ("architectures", JsonValue.Create("LlamaForCausalLM"), "'architectures' must be a list"),
            ("model_type", JsonValue.Create(5), "is not supported"),
        })
        {
            string hf = HuggingFaceDir(dir, c => { c[key] = value.DeepClone(); if (key == "model_type") c.Remove("architectures"); });
            StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(hf)).Message, expected, key);
            var (code, _, err) = Cli.Run("info", "--model", hf);
            Assert.AreEqual(AnyPrecCli.ExitBadInput, code, err);
            AssertOneErrorLine(err, expected);
        }
    }

    [TestMethod]
    [DataRow(DType.F32)]
    [DataRow(DType.F16)]
    [DataRow(DType.BF16)]
    public void NonFiniteWeightsAreRefusedAtLoadNamingTensorAndIndex(DType dtype)
    {
        using var dir = TestData.NewTempDir();
        var c = TestData.TinyConfig();
        var rng = new Random((int)dtype);
        foreach (float bad in new[] { float.NaN, float.PositiveInfinity, float.NegativeInfinity })
        {
            var w = TestData.RandomWeights(c, seed: 5);
            // A position past the vector body and one inside it, so both the vector scan and its tail are checked.
            int row = rng.Next(c.HiddenDim), col = rng.Next(c.Dim);
            w.Blocks[1].Up[row * c.Dim + col] = bad;
            string hf = dir[$"nan-{dtype}-{bad}"];
            Directory.CreateDirectory(hf);
            var tensors = new List<TensorToWrite> { TensorToWrite.FromFloats(LlamaTensorNames.Embedding, w.Embedding, [c.VocabSize, c.Dim], dtype) };
            for (int l = 0; l < c.Layers; l++)
            {
                tensors.Add(TensorToWrite.FromFloats(LlamaTensorNames.Layer(l, "input_layernorm"), w.Blocks[l].AttentionNorm, [c.Dim], dtype));
                tensors.Add(TensorToWrite.FromFloats(LlamaTensorNames.Layer(l, "post_attention_layernorm"), w.Blocks[l].FfnNorm, [c.Dim], dtype));
                foreach (var part in LlamaTensorNames.BlockLinears)
                    tensors.Add(TensorToWrite.FromFloats(LlamaTensorNames.Layer(l, part), w.Blocks[l].Linear(part), LlamaTensorNames.ShapeOf(c, part), dtype));
            }
            tensors.Add(TensorToWrite.FromFloats(LlamaTensorNames.FinalNorm, w.FinalNorm, [c.Dim], dtype));
            tensors.Add(TensorToWrite.FromFloats(LlamaTensorNames.Head, w.Head, [c.VocabSize, c.Dim], dtype));
            SafetensorsWriter.Write(Path.Combine(hf, "model.safetensors"), tensors);
            File.WriteAllText(Path.Combine(hf, "config.json"), HuggingFaceExport.ConfigJson(c, dtype).ToJsonString());

            var e = Assert.ThrowsExactly<ModelFormatException>(() => LlamaCheckpoint.Open(hf));
            StringAssert.Contains(e.Message, $"tensor 'model.layers.1.mlp.up_proj.weight' holds a non-finite value (NaN or ±Inf) at flat index {row * c.Dim + col} [{row}, {col}]");
        }
    }

    [TestMethod]
    public void NonFiniteWeightsInALlama2cFileAreRefusedByTheCli()
    {
        using var dir = TestData.NewTempDir();
        var bytes = File.ReadAllBytes(TestData.Stories260K);
        // Version 0: the embedding comes first after the 28-byte header; element 1000 is [1000 / dim, 1000 % dim].
        BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(28 + 4 * 1000), float.PositiveInfinity);
        File.WriteAllBytes(dir["inf.bin"], bytes);
        var (code, _, err) = Cli.Run("generate", "--model", dir["inf.bin"], "--max-tokens", "3");
        Assert.AreEqual(AnyPrecCli.ExitBadInput, code);
        AssertOneErrorLine(err, "tensor 'model.embed_tokens.weight' holds a non-finite value (NaN or ±Inf) at flat index 1000 [15, 40]");
    }

    private sealed class NaNSensitivity : ISensitivitySource
    {
        public string Kind => "hessian";
        public LayerSensitivity For(int layer, string part, int rows, int cols)
        {
            var values = Enumerable.Repeat(1f, cols).ToArray();
            if (layer == 0 && part == "self_attn.v_proj") values[17] = float.NaN;
            return LayerSensitivity.Columns(values, rows);
        }
    }

    [TestMethod]
    public void NonFiniteSensitivityIsRefusedAtQuantizeAndNoOutputIsLeft()
    {
        using var dir = TestData.NewTempDir();
        using var source = LlamaCheckpoint.Open(TestData.Stories260K);
        var e = Assert.ThrowsExactly<InvalidDataException>(() => AnyPrecisionQuantizer.Quantize(source, dir["ap"], new NaNSensitivity(), new QuantizerOptions()));
        StringAssert.Contains(e.Message, "'model.layers.0.self_attn.v_proj.weight' is non-finite at [0, 17]");
        Assert.IsFalse(Directory.Exists(dir["ap"]));
        Assert.IsEmpty(Directory.GetDirectories(dir.Path), "no temporary directory is left");
    }

    [TestMethod]
    public void JsonWritesNonFiniteNumbersAsNullWithAReason()
    {
        string line = AnyPrecCli.ToJsonLine(new
        {
            perplexity = double.NaN, nll = double.PositiveInfinity, tokens = 3, ok = 1.25f,
            rows = new object[] { new { bits = 3, rtn = float.NegativeInfinity }, new { bits = 4, rtn = 2.5f } },
            series = new[] { 1.0, double.NaN },
        });
        using var doc = JsonDocument.Parse(line);
        var r = doc.RootElement;
        Assert.AreEqual(JsonValueKind.Null, r.GetProperty("perplexity").ValueKind);
        Assert.AreEqual("not a finite number (NaN)", r.GetProperty("perplexity_reason").GetString());
        Assert.AreEqual("not a finite number (Infinity)", r.GetProperty("nll_reason").GetString());
        Assert.AreEqual(1.25, r.GetProperty("ok").GetDouble());
        Assert.AreEqual(3, r.GetProperty("tokens").GetInt32());
        Assert.AreEqual(JsonValueKind.Null, r.GetProperty("rows")[0].GetProperty("rtn").ValueKind);
        Assert.AreEqual("not a finite number (-Infinity)", r.GetProperty("rows")[0].GetProperty("rtn_reason").GetString());
        Assert.AreEqual(2.5, r.GetProperty("rows")[1].GetProperty("rtn").GetDouble());
        Assert.IsFalse(r.GetProperty("rows")[1].TryGetProperty("rtn_reason", out _));
        Assert.AreEqual(JsonValueKind.Null, r.GetProperty("series")[1].ValueKind);
        Assert.AreEqual("[1]: not a finite number (NaN)", r.GetProperty("series_reason").GetString());
        Assert.DoesNotContain("\uE000", line);
    }

    [TestMethod]
    public void PerplexityJsonOfADivergingModelIsNullWithAReason()
    {
        // Finite weights so large that the forward pass overflows: the model loads, its perplexity is not a number.
        using var dir = TestData.NewTempDir();
        var c = TestData.TinyConfig() with { VocabSize = 512 };
        var w = TestData.RandomWeights(c, seed: 9);
        foreach (var b in w.Blocks) for (int i = 0; i < b.Wo.Length; i++) b.Wo[i] = 3e38f;
        CheckpointTests.WriteHuggingFace(w, dir["big"]);
        File.Copy(TestData.Tok512, dir["big/tokenizer.model"]);
        File.WriteAllText(dir["t.txt"], "Once upon a time there was a cat.");
        var (code, json, err) = Cli.Run("perplexity", "--model", dir["big"], "--text", dir["t.txt"], "--json");
        Assert.AreEqual(0, code, err);
        using var doc = JsonDocument.Parse(json);
        Assert.AreEqual(JsonValueKind.Null, doc.RootElement.GetProperty("perplexity").ValueKind, json);
        StringAssert.StartsWith(doc.RootElement.GetProperty("perplexity_reason").GetString(), "not a finite number");
    }

    [TestMethod]
    public void ErrorsAreOneLineWhatWhereWithExitCodesAndVerboseShowsTheStack()
    {
        using var dir = TestData.NewTempDir();
        File.WriteAllBytes(dir["short.bin"], File.ReadAllBytes(TestData.Stories260K)[..100]);
        var (code, _, err) = Cli.Run("info", "--model", dir["short.bin"]);
        Assert.AreEqual(AnyPrecCli.ExitBadInput, code);
        AssertOneErrorLine(err, $"truncated llama2.c checkpoint: the header implies");
        StringAssert.EndsWith(err.TrimEnd(), $"({dir["short.bin"]})");

        // An out-of-range option: .NET's two-line ArgumentOutOfRangeException text becomes one line.
        (code, _, err) = Cli.Run("quantize", "--model", TestData.Stories260K, "--sensitivity", "uniform", "--seed-bits", "0", "--output", dir["q"]);
        Assert.AreEqual(AnyPrecCli.ExitBadInput, code);
        AssertOneErrorLine(err, "seed bits must be in 1..8");
        Assert.DoesNotContain("Parameter", err);
        Assert.DoesNotContain("Actual value", err);

        // Parse errors get the prefix and the same exit code.
        (code, _, err) = Cli.Run("generate", "--model", TestData.Stories260K, "--max-tokens", "many");
        Assert.AreEqual(AnyPrecCli.ExitBadInput, code);
        StringAssert.StartsWith(err, "error: ");
        StringAssert.Contains(err, "(command line");

        (code, _, err) = Cli.Run("info", "--model", dir["short.bin"], "--verbose");
        Assert.AreEqual(AnyPrecCli.ExitBadInput, code);
        StringAssert.StartsWith(err, "error: ");
        StringAssert.Contains(err, "ModelFormatException", "--verbose adds the exception and its stack");
        StringAssert.Contains(err, "   at AnyPrecML.Models.LlamaCheckpoint");
    }
}

/// <summary>Files that change underneath, and temporary directories of killed or interrupted runs.</summary>
[TestClass]
public sealed class FileSafetyTests
{
    [TestMethod]
    public void FileTruncatedAfterOpenIsAnErrorBeforeItIsMapped()
    {
        using var dir = TestData.NewTempDir();
        var c = TestData.TinyConfig();
        CheckpointTests.WriteHuggingFace(TestData.RandomWeights(c, seed: 1), dir["hf"]);
        string path = dir["hf/model.safetensors"];
        long length = new FileInfo(path).Length;

        using var file = new MappedFile(path);
        using (var fs = new FileStream(path, FileMode.Open, FileAccess.Write, FileShare.ReadWrite)) fs.SetLength(length / 2);
        StringAssert.Contains(Assert.ThrowsExactly<ModelFormatException>(() => file.ReadBytes(length - 16, 16, "tail")).Message, "truncated underneath");
        var e = Assert.ThrowsExactly<ModelFormatException>(() => file.Slice(0, 4, "data").ToArray());
        StringAssert.Contains(e.Message, $"the file is {length / 2} bytes now but was {length} when opened");

        // Through the loader: the truncated file is refused at open, by its header's sizes, without mapping it.
        var (code, _, err) = Cli.Run("info", "--model", dir["hf"]);
        Assert.AreEqual(AnyPrecCli.ExitBadInput, code);
        StringAssert.StartsWith(err, "error: ");
        StringAssert.Contains(err, "outside the");
    }

    private static string[] Temporaries(string parent, string name) => Directory.GetDirectories(parent, "." + name + ".tmp-*");

    [TestMethod]
    public void KillNineDuringQuantizeThenASecondQuantizeLeavesNoTemporaryDirectory()
    {
        using var dir = TestData.NewTempDir();
        string[] args = ["quantize", "--model", TestData.Stories260K, "--sensitivity", "uniform", "--output", dir["ap"]];
        using (var child = ChildCli.Start(args))
        {
            var sw = System.Diagnostics.Stopwatch.StartNew();
            // The marker is written just after the directory is made: wait for it, not only the directory.
            while (Temporaries(dir.Path, "ap") is not [var tmp] || !File.Exists(Path.Combine(tmp, AtomicFile.PartialMarker)))
            {
                Assert.IsFalse(child.HasExited, "quantize finished before it could be killed");
                Assert.IsLessThan(120, sw.Elapsed.TotalSeconds);
                Thread.Sleep(10);
            }
            child.Kill(entireProcessTree: true);
            child.WaitForExit();
        }
        var stale = Temporaries(dir.Path, "ap");
        Assert.HasCount(1, stale, "the killed run left its temporary directory");
        Assert.IsTrue(File.Exists(Path.Combine(stale[0], AtomicFile.PartialMarker)));
        // A directory of the same name without our marker is someone else's: it is left alone.
        string foreign = Path.Combine(dir.Path, ".ap.tmp-foreign");
        Directory.CreateDirectory(foreign);

        var (code, _, err) = Cli.Run(args);
        Assert.AreEqual(0, code, err);
        CollectionAssert.AreEqual(new[] { foreign }, Temporaries(dir.Path, "ap"), "the stale temporary is gone, the foreign one kept");
        using var ap = AnyPrecisionModel.Open(dir["ap"]);
        Assert.AreEqual(8, ap.ParentBits);
    }

    [TestMethod]
    public void CtrlCDuringQuantizeRemovesTheTemporaryDirectory()
    {
        using var dir = TestData.NewTempDir();
        // One thread, and the signal sent by kill(2) from here: with the kill program started under load, quantize (0.6 s
        // on two threads) finished before the signal came (CI, both test projects running at once).
        using var child = ChildCli.Start("quantize", "--model", TestData.Stories260K, "--sensitivity", "uniform", "--threads", "1", "--output", dir["ap"]);
        var stderr = child.StandardError.ReadToEndAsync();
        var sw = System.Diagnostics.Stopwatch.StartNew();
        while (Temporaries(dir.Path, "ap").Length == 0)
        {
            Assert.IsFalse(child.HasExited, "quantize finished before it could be interrupted");
            Assert.IsLessThan(120, sw.Elapsed.TotalSeconds);
            Thread.Sleep(10);
        }
        PosixSignals.Send(child.Id, PosixSignals.SigInt);
        Assert.IsTrue(child.WaitForExit(TimeSpan.FromSeconds(60)));
        Assert.AreEqual(AnyPrecCli.ExitCancelled, child.ExitCode, stderr.Result);
        StringAssert.StartsWith(stderr.Result.Split('\n').Last(l => l.Length > 0), "error: ");
        Assert.IsEmpty(Temporaries(dir.Path, "ap"));
        Assert.IsFalse(Directory.Exists(dir["ap"]));
    }
}

/// <summary>kill(2), called from the test process: a signal that arrives at once, where starting the kill program takes a while under load.</summary>
internal static partial class PosixSignals
{
    public const int SigInt = 2;

    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int Kill(int pid, int signal);

    public static void Send(int pid, int signal)
    {
        if (Kill(pid, signal) != 0) throw new System.ComponentModel.Win32Exception(System.Runtime.InteropServices.Marshal.GetLastPInvokeError());
    }
}
