using AnyPrecML.Models;
using AnyPrecML.Tokenization;

namespace AnyPrecML.Tests;

[TestClass]
public sealed class TokenizerTests
{
    [TestMethod]
    public void OnceUponATimeEncodesAsLlama2cDoes()
    {
        var tok = LlamaTokenizerLoader.Load(TestData.Tok512);
        var ids = tok.EncodeToIds("Once upon a time");
        CollectionAssert.AreEqual(new[] { 1, 403, 407, 261, 378 }, ids.Take(5).ToArray());
        Assert.AreEqual("Once upon a time", tok.Decode(ids));
    }

    [TestMethod]
    public void Llama2TokenizerLoadsAtFullVocabulary()
    {
        var tok = LlamaTokenizerLoader.Load(TestData.Shared("models", "llama2-tokenizer", "tokenizer.model"));
        Assert.AreEqual(32000, tok.Vocabulary.Count);
        var ids = tok.EncodeToIds("Hello world");
        Assert.AreEqual(1, ids[0]);
        Assert.AreEqual("Hello world", tok.Decode(ids));
    }

    [TestMethod]
    public void MissingTokenizerIsNamed()
    {
        using var dir = TestData.NewTempDir();
        File.Copy(TestData.Stories260K, dir["model.bin"]);
        using var cp = LlamaCheckpoint.Open(dir["model.bin"]);
        Assert.IsNull(cp.TokenizerPath);
        var e = Assert.ThrowsExactly<FileNotFoundException>(() => LlamaTokenizerLoader.Load(cp));
        StringAssert.Contains(e.Message, "--tokenizer");
        File.WriteAllText(dir["bad.model"], "not a protobuf");
        Assert.ThrowsExactly<ModelFormatException>(() => LlamaTokenizerLoader.Load(dir["bad.model"]));
    }

    [TestMethod]
    public void TokenizerLargerThanTheModelIsRejected()
    {
        using var cp = LlamaCheckpoint.Open(TestData.Stories260K);
        var e = Assert.ThrowsExactly<ModelFormatException>(() => LlamaTokenizerLoader.Load(cp, TestData.Shared("models", "llama2-tokenizer", "tokenizer.model")));
        StringAssert.Contains(e.Message, "32000");
    }
}
